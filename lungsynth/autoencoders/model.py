"""The four autoencoder networks of chapter 02 (MONAI AutoencoderKL / VQVAE behind one wrapper),
their architecture spec, and loading a trained one from its checkpoint without unpickling objects.

:class:`Autoencoder` maps an image [B, C, *S] to a latent [B, c, *S/4] (``encode`` / ``decode`` raw,
``encode_latent`` / ``decode_latent`` times the latent scale factor); see :mod:`lungsynth.autoencoders`.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from lungsynth import paths
from lungsynth.runtime import autocast

KINDS: tuple[str, ...] = ("vae3d", "vqvae2d", "vae2d", "maskvae")
DOWNSAMPLE = 4  # every autoencoder of the course compresses each spatial side by 4
ARCH_KEYS: tuple[str, ...] = ("kind", "spatial_dims", "in_channels", "channels", "num_res_blocks",
                              "latent_channels", "downsample", "quantized", "num_embeddings", "embedding_dim",
                              "norm_num_groups", "net_shift", "net_scale")
MODULE_NAME = "autoencoder"
LOG_VAR_INIT = -6.0
FINAL_NAME = "final.pt"
TEXTURES = (1, 2, 3, 4, 5)
LUNG_COND = 0.1  # the condition mask's lung value (0.5 / 5)

# Which prepared-data view each kind trains on, and the item key holding its image.
TRAINING_VIEWS: dict[str, tuple[str, str]] = {
    "vae3d": ("volume", "ct"),
    "maskvae": ("volume", "cond"),
    "vqvae2d": ("slice", "image"),
    "vae2d": ("roi", "image"),
}


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown autoencoder kind {kind!r}; valid kinds: {', '.join(KINDS)}")


def default_run_dir(kind: str, cfg: Any, create: bool = True) -> Path:
    """``runs/<profile>/02_<kind>`` (e.g. ``02_vae3d``) for a config, with ``@<overrides>`` when it overrides a
    setting that trains ``kind`` (:func:`lungsynth.run_settings.run_name`); a profile name gives the profile's
    own run."""
    from lungsynth import run_settings

    check_kind(kind)
    if isinstance(cfg, str):
        return paths.run_dir(cfg, f"02_{kind}", create=create)
    return paths.run_dir(cfg.profile, run_settings.run_name(cfg, f"02_{kind}", autoencoders=(kind,)), create=create)


def autoencoder_spec(kind: str, cfg: Any) -> dict[str, Any]:
    """The architecture of ``kind`` under ``cfg`` as plain values (stored as the checkpoint config).

    Only what shapes the weights is here; loss weights and budgets are not (a run may be resumed
    with another learning rate, but not with other channels).
    """
    check_kind(kind)
    a = cfg.autoencoders
    spec: dict[str, Any] = {"kind": kind, "downsample": DOWNSAMPLE, "in_channels": 1, "quantized": False,
                            "num_embeddings": 0, "embedding_dim": 0, "net_shift": 0.5, "net_scale": 2.0}
    if kind == "vae3d":
        spec.update(spatial_dims=3, channels=list(a.vae3d_channels), num_res_blocks=1,
                    latent_channels=int(a.latent_channels))
    elif kind == "maskvae":
        spec.update(spatial_dims=3, channels=list(a.maskvae_channels), num_res_blocks=1,
                    latent_channels=int(a.mask_latent_channels), net_shift=0.0, net_scale=5.0)
    elif kind == "vae2d":
        spec.update(spatial_dims=2, channels=list(a.vae2d_channels), num_res_blocks=1,
                    latent_channels=int(a.latent_channels))
    else:
        spec.update(spatial_dims=2, channels=list(a.vqvae2d_channels), num_res_blocks=1,
                    latent_channels=int(a.vq_embedding_dim), quantized=True,
                    num_embeddings=int(a.vq_num_embeddings), embedding_dim=int(a.vq_embedding_dim),
                    commitment_cost=float(a.vq_commitment_cost), decay=float(a.vq_decay))
    spec["norm_num_groups"] = 0 if spec["quantized"] else default_norm_groups(spec["channels"])
    levels = len(spec["channels"])
    expected = 3 if not spec["quantized"] else 2
    if levels != expected:
        raise ValueError(f"{kind} needs {expected} channel levels for x{DOWNSAMPLE} compression "
                         f"(got channels {tuple(spec['channels'])})")
    return spec


def default_norm_groups(channels: Sequence[int]) -> int:
    """GroupNorm groups with at least 4 channels per group (at most 32 groups, as in LDM/MAISI).

    With one channel per group GroupNorm is InstanceNorm: a uniform patch (all lung, all soft
    tissue) normalises to the same features whatever its HU, and the decoder's last norm cannot
    carry absolute intensity. Several channels per group keep it, in their relative levels.
    """
    g = 0
    for c in channels:
        g = math.gcd(g, int(c))
    return max(1, min(32, g // 4))


class Autoencoder(nn.Module):
    """One interface over the course's four autoencoders (see the module docstring).

    Args:
        spec: from :func:`autoencoder_spec` (or a checkpoint's config).

    Attributes:
        kind, spatial_dims, latent_channels, downsample (4), quantized.
        scale_factor: the latent scale factor (1/std of training latents), set after training
            and stored in the checkpoint config; ``encode_latent``/``decode_latent`` apply it.
        net: the MONAI network (``AutoencoderKL`` or ``VQVAE``).
    """

    def __init__(self, spec: Mapping[str, Any]) -> None:
        super().__init__()
        self.spec = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in spec.items()
                     if k != "scale_factor"}
        self.kind: str = spec["kind"]
        self.spatial_dims: int = int(spec["spatial_dims"])
        self.in_channels: int = int(spec["in_channels"])
        self.latent_channels: int = int(spec["latent_channels"])
        self.downsample: int = int(spec["downsample"])
        self.quantized: bool = bool(spec["quantized"])
        self.scale_factor: float = float(spec.get("scale_factor", 1.0))
        self.net_shift: float = float(spec.get("net_shift", 0.5))
        self.net_scale: float = float(spec.get("net_scale", 2.0))
        channels = tuple(int(c) for c in spec["channels"])
        if self.quantized:
            from monai.networks.nets import VQVAE

            self.net = VQVAE(
                spatial_dims=self.spatial_dims, in_channels=self.in_channels, out_channels=self.in_channels,
                channels=channels, num_res_layers=int(spec["num_res_blocks"]), num_res_channels=channels,
                downsample_parameters=((2, 4, 1, 1),) * len(channels),
                upsample_parameters=((2, 4, 1, 1, 0),) * len(channels),
                num_embeddings=int(spec["num_embeddings"]), embedding_dim=int(spec["embedding_dim"]),
                commitment_cost=float(spec.get("commitment_cost", 0.25)), decay=float(spec.get("decay", 0.99)))
        else:
            from monai.networks.nets import AutoencoderKL

            # MAISI/LAND: no attention anywhere, so memory grows linearly with the volume.
            self.net = AutoencoderKL(
                spatial_dims=self.spatial_dims, in_channels=self.in_channels, out_channels=self.in_channels,
                num_res_blocks=int(spec["num_res_blocks"]), channels=channels,
                attention_levels=(False,) * len(channels), latent_channels=self.latent_channels,
                norm_num_groups=int(spec.get("norm_num_groups") or default_norm_groups(channels)), with_encoder_nonlocal_attn=False,
                with_decoder_nonlocal_attn=False, include_fc=False)
            # Start with a narrow posterior (sigma ~ 0.05 instead of 1): the decoder sees the
            # encoder's signal from the first step instead of unit noise. With kl_weight ~1e-6
            # the trained posterior ends up narrow anyway; this only shortens the way there.
            nn.init.constant_(self.net.quant_conv_log_sigma.conv.bias, LOG_VAR_INIT)
        if self.spatial_dims == 3:
            # oneDNN's 3D convolutions run 1.2-1.6x faster on channels-last tensors (a vae3d training step,
            # bf16 on 2 AMX cores: 0.265 -> 0.219 s at (16, 32, 32), 0.759 -> 0.473 s at (32, 64, 64))
            self.net.to(memory_format=torch.channels_last_3d)

    # ------------------------------------------------------------------ value range

    def _to_net(self, x: torch.Tensor) -> torch.Tensor:
        """[0,1] input -> the network's range: (x - shift) * scale.

        Images: [-1,1] (zero-centred, as in LDM/MAISI). Condition masks: texture units (x5:
        lung 0.5, nodules 1..5), so the few non-zero levels stand out of the optimiser's noise.
        """
        y = (x - self.net_shift) * self.net_scale
        return y.contiguous(memory_format=torch.channels_last_3d) if y.ndim == 5 else y

    def _from_net(self, y: torch.Tensor) -> torch.Tensor:
        return y / self.net_scale + self.net_shift

    # ------------------------------------------------------------------ shapes

    def valid_size(self, n: int) -> bool:
        return n > 0 and n % self.downsample == 0

    def check_input(self, x: torch.Tensor, what: str = "input") -> None:
        """ValueError unless ``x`` is [B, in_channels, *spatial] with every side a multiple of 4."""
        want = 2 + self.spatial_dims
        if x.ndim != want or x.shape[1] != self.in_channels:
            layout = "[B,1,D,H,W]" if self.spatial_dims == 3 else "[B,1,H,W]"
            raise ValueError(f"{self.kind} takes {what} shaped {layout} with {self.in_channels} channel(s); "
                             f"got {tuple(x.shape)}")
        bad = [n for n in x.shape[2:] if not self.valid_size(int(n))]
        if bad:
            examples = ", ".join(str(self.downsample * k) for k in (8, 16, 32, 64))
            raise ValueError(f"{self.kind} compresses each side by {self.downsample}, so it takes sizes that are "
                             f"multiples of {self.downsample} (e.g. {examples}); got spatial size "
                             f"{tuple(int(n) for n in x.shape[2:])}. Resample or pad the {what} "
                             f"(e.g. cfg.data.size_3d / size_2d are multiples of {self.downsample}).")

    def check_latent(self, z: torch.Tensor) -> None:
        want = 2 + self.spatial_dims
        if z.ndim != want or z.shape[1] != self.latent_channels:
            raise ValueError(f"{self.kind} decodes latents shaped [B,{self.latent_channels},"
                             + ",".join(["s"] * self.spatial_dims) + f"]; got {tuple(z.shape)}")

    def latent_shape(self, spatial: Sequence[int] | int) -> tuple[int, ...]:
        """(latent_channels, *spatial / 4) for an input of side(s) ``spatial``."""
        if isinstance(spatial, int):
            spatial = (spatial,) * self.spatial_dims
        self.check_input(torch.empty((1, self.in_channels, *spatial), device="meta"))
        return (self.latent_channels, *(int(s) // self.downsample for s in spatial))

    # ------------------------------------------------------------------ raw maps

    def _encode_whole(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(x.device):  # convolutions in bf16 where the device runs it fast
            e = self.net.encode(self._to_net(x))
        if self.quantized:  # the nearest-code search stays fp32
            e = e.float()
            z = self.net.quantizer.embed(self.net.quantizer.quantize(e))
            return z, torch.zeros_like(z)
        mean, std = e
        return mean.float(), std.float()

    def _decode_whole(self, z: torch.Tensor) -> torch.Tensor:
        if self.quantized:
            # Nearest-code lookup without the EMA codebook update of the training forward.
            z = self.net.quantizer.embed(self.net.quantizer.quantize(z))
        with autocast(z.device):
            out = self.net.decode(z).float()
        # Every input of the course lies in [0,1] (clipped HU, condition masks): so does a decoding.
        return self._from_net(out).clamp(0.0, 1.0)

    def _roi(self, roi_size: int | Sequence[int] | None, shape: Sequence[int], factor: int = 1) -> list[int] | None:
        if roi_size is None:
            return None
        roi = [int(roi_size)] * self.spatial_dims if isinstance(roi_size, int) else [int(r) for r in roi_size]
        if len(roi) != self.spatial_dims or any(r <= 0 or r % self.downsample for r in roi):
            raise ValueError(f"sliding-window size {roi_size} must be {self.spatial_dims} positive multiple(s) "
                             f"of {self.downsample} (image voxels)")
        roi = [r // factor for r in roi]
        if all(s <= r for s, r in zip(shape, roi)):
            return None  # the whole input fits in one window
        return roi

    def encode(self, x: torch.Tensor, roi_size: int | Sequence[int] | None = None,
               overlap: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior of ``x``: [B,1,*S] -> (mean, std), each [B,c,*S/4].

        The VQ-VAE returns (quantised embedding, zeros). With ``roi_size`` (image voxels) smaller
        than the input, encodes by a Gaussian-weighted sliding window (:meth:`sliding_encode`).
        """
        self.check_input(x)
        roi = self._roi(roi_size, x.shape[2:])
        if roi is None:
            return self._encode_whole(x)
        return self.sliding_encode(x, roi, overlap)

    def decode(self, z: torch.Tensor, roi_size: int | Sequence[int] | None = None,
               overlap: float = 0.25) -> torch.Tensor:
        """Latent [B,c,*s] (unscaled) -> image [B,1,*4s] in [0,1]; ``roi_size`` in image voxels as for encode."""
        self.check_latent(z)
        roi = self._roi(roi_size, z.shape[2:], factor=self.downsample)
        if roi is None:
            return self._decode_whole(z)
        return self.sliding_decode(z, roi, overlap)

    def sliding_encode(self, x: torch.Tensor, roi: Sequence[int], overlap: float = 0.25
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode window by window (``roi`` in image voxels) and blend the latents.

        ``monai.inferers.sliding_window_inference`` handles predictors whose output is a zoom of
        their input (here x1/4): window corners are multiples of 4 when ``roi`` and the input are,
        so every window lands on whole latent voxels. Gaussian blending weights the centre of
        each window, where the encoder saw its whole receptive field.
        """
        from monai.inferers import sliding_window_inference

        out = sliding_window_inference(x, list(roi), 1, lambda t: self._encode_whole(t), overlap=overlap,
                                       mode="gaussian")
        mean, std = out  # type: ignore[misc]
        return mean, std

    def sliding_decode(self, z: torch.Tensor, roi: Sequence[int], overlap: float = 0.25) -> torch.Tensor:
        """Decode window by window (``roi`` in latent voxels); the output is 4x each window.

        The decoder's output is a x4 zoom of its input, which MONAI's sliding window supports
        directly (it rescales window positions and the Gaussian importance map), so no hand-made
        overlap-blend is needed. Peak memory then scales with the window, not the volume: the
        decoder's widest activations (channels[0] at full resolution) exist for one window at a
        time, and only the 1-channel output is full size. ``lungsynth bench vae`` measures it.
        """
        from monai.inferers import sliding_window_inference

        return sliding_window_inference(z, list(roi), 1, self._decode_whole, overlap=overlap,
                                        mode="gaussian")  # type: ignore[return-value]

    # ------------------------------------------------------------------ training and latents

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training pass: [B,1,*S] -> {"recon" [B,1,*S], and "mean","std" (KL) or "vq_loss" (VQ)}.

        The KL kinds decode a sample z = mean + std * eps (the reparameterisation trick).
        """
        self.check_input(x)
        if self.quantized:
            recon, vq_loss = self.net(self._to_net(x))
            return {"recon": self._from_net(recon), "vq_loss": vq_loss}
        mean, std = self.net.encode(self._to_net(x))
        z = mean + std * torch.randn_like(std)
        return {"recon": self._from_net(self.net.decode(z)), "mean": mean, "std": std}

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, roi_size: int | Sequence[int] | None = None,
                    overlap: float = 0.25) -> torch.Tensor:
        """Deterministic reconstruction (posterior mean): [B,1,*S] -> [B,1,*S]."""
        mean, _ = self.encode(x, roi_size, overlap)
        return self.decode(mean, roi_size, overlap)

    def codebook_indices(self, x: torch.Tensor) -> torch.Tensor:
        """VQ-VAE only: code index per latent voxel, [B,*S/4] long."""
        if not self.quantized:
            raise ValueError(f"{self.kind} has no codebook (only the VQ-VAE does)")
        self.check_input(x)
        return self.net.index_quantize(self._to_net(x))

    def encode_latent(self, x: torch.Tensor, sample: bool = True, roi_size: int | Sequence[int] | None = None,
                      overlap: float = 0.25) -> torch.Tensor:
        """Diffusion-space latent: ``scale_factor * z`` with z = mean + std * eps (``sample``) or the mean."""
        mean, std = self.encode(x, roi_size, overlap)
        z = mean + std * torch.randn_like(std) if sample and not self.quantized else mean
        return z * self.scale_factor

    def decode_latent(self, z: torch.Tensor, roi_size: int | Sequence[int] | None = None,
                      overlap: float = 0.25) -> torch.Tensor:
        """Inverse of :meth:`encode_latent`: decode ``z / scale_factor`` to an image."""
        return self.decode(z / self.scale_factor, roi_size, overlap)


# ---------------------------------------------------------------------- factory and loading


def codebook_stats(indices: torch.Tensor, num_embeddings: int) -> dict[str, float]:
    """Usage and perplexity of a VQ codebook from the code index of every latent voxel.

    usage = (#codes used at least once) / K;
    perplexity = exp(H(p)) with p the empirical code frequencies, H(p) = -sum_k p_k log p_k
    (1 when one code is used, K when all are used equally often).
    """
    idx = torch.as_tensor(indices).reshape(-1).long()
    if idx.numel() == 0:
        raise ValueError("codebook_stats needs at least one index")
    if int(idx.min()) < 0 or int(idx.max()) >= num_embeddings:
        raise ValueError(f"indices must lie in [0, {num_embeddings}); got [{int(idx.min())}, {int(idx.max())}]")
    counts = torch.bincount(idx, minlength=num_embeddings).double()
    p = counts / counts.sum()
    nz = p[p > 0]
    entropy = float(-(nz * nz.log()).sum())
    return {"usage": float((counts > 0).sum()) / num_embeddings, "perplexity": math.exp(entropy),
            "codes_used": int((counts > 0).sum())}


def build_autoencoder(kind: str, cfg: Any) -> Autoencoder:
    """A fresh (untrained) autoencoder of ``kind`` with the architecture of ``cfg``."""
    return Autoencoder(autoencoder_spec(kind, cfg))


def _final_path(run_dir_or_ckpt: Path | str) -> Path:
    path = Path(run_dir_or_ckpt)
    if path.is_dir():
        final = path / FINAL_NAME
        if not final.is_file():
            last = path / "last.pt"
            hint = (f"it has {last.name} (a run that did not finish): run ensure_autoencoder or "
                    f"`lungsynth autoencoder train` again to finish it" if last.is_file() else
                    "train one with `lungsynth autoencoder train --kind <kind>`")
            raise FileNotFoundError(f"no {FINAL_NAME} in {path}; {hint}")
        return final
    if not path.is_file():
        raise FileNotFoundError(f"no autoencoder checkpoint at {path}; train one with "
                                f"`lungsynth autoencoder train --kind <kind>` or pass its run directory")
    return path


def load_autoencoder(kind: str, run_dir_or_ckpt: Path | str, cfg: Any = None,
                     device: torch.device | str = "cpu") -> Autoencoder:
    """Load a trained autoencoder (eval mode, frozen) from a run directory or checkpoint file.

    Refuses (ValueError naming both sides) a checkpoint of another kind, or — when ``cfg`` is
    given — one whose architecture differs from what ``cfg`` builds. The scale factor comes from
    the checkpoint config.
    """
    from lungsynth.engine import check_compatible, load_checkpoint

    check_kind(kind)
    path = _final_path(run_dir_or_ckpt)
    ckpt = load_checkpoint(path, map_location="cpu")
    wanted = autoencoder_spec(kind, cfg) if cfg is not None else None
    check_compatible(ckpt, path, kind, wanted, keys=ARCH_KEYS if wanted is not None else None)
    stored = dict(ckpt.get("config") or {})
    missing = [k for k in ARCH_KEYS if k not in stored]
    if missing:
        raise ValueError(f"{path} has no autoencoder architecture in its config (missing {missing}); "
                         f"it was not written by lungsynth.autoencoders")
    ae = Autoencoder(stored)
    ae.net.load_state_dict(_strip(ckpt["modules"][MODULE_NAME]))
    if "scale_factor" not in stored:
        warnings.warn(f"{path} has no latent scale factor (training did not finish); using 1.0", stacklevel=2)
    ae.step = int(ckpt.get("step", 0))  # type: ignore[assignment]
    ae.checkpoint_path = str(path)  # type: ignore[assignment]
    ae.eval().requires_grad_(False)
    return ae.to(device)


def _strip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The engine saves the Autoencoder module; its weights live under ``net.``."""
    return {k[len("net."):] if k.startswith("net.") else k: v for k, v in state.items()}
