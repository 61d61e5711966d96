"""The networks of chapter 04 (Mari et al., Fig. 1): the frozen VQ-VAE, the conditioned U-Net, the condition encoding.

The paper has no numbered equations; references are to its sections (Mari §2.2, Table 2) and, for the
diffusion itself, to Ho et al. 2020 (DDPM, eqs. 4 and 14).

- **VQ-VAE** (Mari §2.2): ``z_0 = E(x)`` [4, H/4, W/4], x4 compression, frozen (chapter 02's ``vqvae2d``);
  :func:`autoencoder`, :func:`encode`, :func:`decode`.
- **U-Net** (Mari §2.2): ``eps_theta([z_t, m], t, c)`` predicts the noise of
  ``z_t = sqrt(ab_t) z_0 + sqrt(1 - ab_t) eps`` (DDPM eq. 4); in = latent + 1 mask channel
  (:func:`build_unet`).
- **Condition encoding** (Mari §2.2, the three configurations of Table 2):

=======  ====================================================================================
config   condition
=======  ====================================================================================
1        the square box mask, max-pooled to the latent grid, concatenated to ``z_t``
2        (1) + the mask in cross-attention (:class:`ConditionEncoder`)
3        (2) + the attribute embedding in cross-attention (:class:`AttributeEmbedder`)
=======  ====================================================================================

  ``m = maxpool_4(box_mask(y0, x0, side))`` (:func:`box_masks`, :func:`mask_to_latent`). The paper "injects the
  binary mask and the embedding of nodule attributes into the cross-attention layers by flattening and
  concatenating the vectors" (Mari §2.2), so the context is **one token** ``c = [vec(m)]`` (config 2) or
  ``c = [vec(m); a]`` (config 3) of width ``h w`` (+ D') (``mask_context="flat"``, every profile's default). With
  a single key, attention's softmax is 1: the token reaches every position through the key/value projections
  alone, as the same vector. The course's earlier form, ``mask_context="pooled"``, is kept as a named option:
  ``c = [T(m)]`` or ``c = [T(m); a]``, ``T`` the shared mask tokenizer (grid^2 tokens of width D', with learned
  positions), so a query can attend to where the box is. Chapter 04 compares the two on configuration 2. In
  both forms the attribute vector is

      a = FC_{128->D'}(ReLU(FC_{128->128}(ReLU(FC_{5D->128}([E_1(s_1); ...; E_5(s_5)])))))

  The attribute embedder is the paper's: one learnable table ``E_k`` per attribute (sphericity, margin,
  lobulation, spiculation, texture; scores 1..5) of width D = 10, the five vectors concatenated
  (5 D = 50), two fully connected layers of 128 units with ReLU, then a linear output of D' = 10.
  It enters the U-Net as it is: appended to the flattened mask, or as one more token of width D'.
- **The loss** (Mari §2.2; DDPM eq. 14): ``L = E_{z_0, eps, t} || eps - eps_theta([z_t, m], t, c) ||^2``, the
  course's shared ``lungsynth.diffusion.objectives.diffusion_loss``, taken in
  :meth:`lungsynth.methods.bbox_ldm.train.BboxLdmTask.training_step`.

Conditions are validated here: boxes ``(y0, x0, side)`` entirely inside the image
(:func:`validate_boxes`), scores integers in 1..5 (:func:`validate_attributes`), configuration 1, 2 or 3
(:func:`check_config`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

ATTRIBUTES: tuple[str, ...] = ("sphericity", "margin", "lobulation", "spiculation", "texture")
SCORE_MIN, SCORE_MAX = 1, 5
CONFIGS: tuple[int, ...] = (1, 2, 3)
# how the box mask enters cross-attention (configs 2, 3): "flat" is the paper's one flattened vector (Mari §2.2),
# "pooled" the course's grid^2 tokens of the shared MaskTokenizer (a named departure, compared in chapter 04)
MASK_CONTEXTS: tuple[str, ...] = ("flat", "pooled")
CONFIG_NAMES: dict[int, str] = {1: "mask concat", 2: "mask concat + mask cross-attn",
                                3: "mask concat + mask & attribute cross-attn"}
# The course's anatomical variant (not a Table 2 row): configuration 3 with the lung mask of a real slice as one
# more input channel, so the anatomy is generated around the box (the paper's failure mode, Mari §3.2, is a box
# drawn independently of the anatomy the model then invents)
LUNG_CONFIG = 3


# --------------------------------------------------------------------------- validation


def check_config(config: int | str) -> int:
    """``1 | 2 | 3`` (int or str) -> int; anything else is a ValueError."""
    try:
        value = int(config)
    except (TypeError, ValueError):
        value = -1
    if value not in CONFIGS:
        raise ValueError(f"unknown bbox-LDM configuration {config!r}; use 1 (mask concat), 2 (+ mask "
                         f"cross-attention) or 3 (+ attribute cross-attention)")
    return value


def check_mask_context(name: str) -> str:
    """``"flat"`` (the paper's flattened mask) or ``"pooled"`` (the course's mask tokens); anything else is a
    ValueError."""
    if name not in MASK_CONTEXTS:
        raise ValueError(f"unknown bbox_ldm.mask_context {name!r}; use 'flat' (the paper's flattened mask, one "
                         f"cross-attention token) or 'pooled' (grid^2 mask tokens)")
    return name


def validate_attributes(attributes: torch.Tensor | Sequence) -> torch.Tensor:
    """LIDC scores ``[B, 5]`` (sphericity, margin, lobulation, spiculation, texture), each in 1..5.

    Returns a LongTensor [B, 5]; a wrong shape, a non-integer or a score outside 1..5 is a ValueError.
    """
    t = torch.as_tensor(attributes)
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2 or t.shape[1] != len(ATTRIBUTES):
        raise ValueError(f"attributes must have shape [B, {len(ATTRIBUTES)}] ({', '.join(ATTRIBUTES)}), "
                         f"got {tuple(t.shape)}")
    if t.is_floating_point():
        if not torch.all(t == t.round()):
            raise ValueError("attributes must be integer LIDC scores in 1..5; round the reader medians first")
        t = t.round()
    t = t.long()
    bad = (t < SCORE_MIN) | (t > SCORE_MAX)
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"attribute {ATTRIBUTES[col]} = {int(t[row, col])} (sample {row}) is outside "
                         f"{SCORE_MIN}..{SCORE_MAX}; LIDC scores are integers from 1 to 5")
    return t


def validate_boxes(boxes: torch.Tensor | Sequence, image_size: int | tuple[int, int]) -> torch.Tensor:
    """Square boxes ``[B, 3]`` as ``(y0, x0, side)`` in pixels, every one entirely inside the image.

    Returns a LongTensor [B, 3]; a side < 1 or a box reaching outside ``image_size`` is a ValueError.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    b = torch.as_tensor(boxes)
    if b.ndim == 1:
        b = b[None]
    if b.ndim != 2 or b.shape[1] != 3:
        raise ValueError(f"boxes must have shape [B, 3] as (y0, x0, side) in pixels, got {tuple(b.shape)}")
    b = b.round().long()
    for i, (y0, x0, s) in enumerate(b.tolist()):
        if s < 1:
            raise ValueError(f"box {i} has side {s}; a box needs a side of at least 1 pixel")
        if y0 < 0 or x0 < 0 or y0 + s > h or x0 + s > w:
            raise ValueError(f"box {i} (y0={y0}, x0={x0}, side={s}) lies outside the {h}x{w} image; "
                             f"every box must fit entirely inside it")
    return b


# --------------------------------------------------------------------------- condition encoding (Mari §2.2)


def box_masks(boxes: torch.Tensor, image_size: int | tuple[int, int]) -> torch.Tensor:
    """Boxes [B, 3] (y0, x0, side) -> binary masks [B, 1, H, W] float32 (validated first)."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    b = validate_boxes(boxes, (h, w))
    out = torch.zeros(b.shape[0], 1, h, w)
    for i, (y0, x0, s) in enumerate(b.tolist()):
        out[i, 0, y0:y0 + s, x0:x0 + s] = 1.0
    return out


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """Binary box masks [B, 1, H, W] -> boxes [B, 3] (y0, x0, side = the longer extent).

    An empty mask is a ValueError (every training slice holds a nodule)."""
    out = []
    for i, m in enumerate(masks[:, 0] > 0.5):
        ys, xs = torch.nonzero(m, as_tuple=True)
        if ys.numel() == 0:
            raise ValueError(f"box mask {i} is empty; every slice of chapter 04 must hold a nodule box")
        y0, x0 = int(ys.min()), int(xs.min())
        side = max(int(ys.max()) - y0 + 1, int(xs.max()) - x0 + 1)
        out.append((y0, x0, side))
    return torch.tensor(out, dtype=torch.long)


def lung_to_latent(lung: torch.Tensor, factor: int) -> torch.Tensor:
    """Lung mask [B, 1, H, W] -> latent grid [B, 1, H/f, W/f], the lung fraction of each latent pixel."""
    if lung.shape[-1] % factor or lung.shape[-2] % factor:
        raise ValueError(f"lung mask of size {tuple(lung.shape[-2:])} is not divisible by the autoencoder factor {factor}")
    return F.avg_pool2d((lung > 0.5).float(), kernel_size=factor, stride=factor)


def mask_to_latent(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Box mask [B, 1, H, W] -> latent grid [B, 1, H/f, W/f] by max-pooling (a small nodule survives)."""
    if mask.shape[-1] % factor or mask.shape[-2] % factor:
        raise ValueError(f"mask of size {tuple(mask.shape[-2:])} is not divisible by the autoencoder factor {factor}")
    return F.max_pool2d(mask.float(), kernel_size=factor, stride=factor)


# --------------------------------------------------------------------------- condition encoders


class AttributeEmbedder(nn.Module):
    """Mari et al.'s attribute embedding: LongTensor [B, 5] scores 1..5 -> [B, D'].

    ``tables[k]`` is an ``nn.Embedding(5, D)`` for attribute k (score s -> row s - 1); the five
    vectors are concatenated (5 D), passed through FC(5D -> 128) + ReLU, FC(128 -> 128) + ReLU and a
    linear output FC(128 -> D').
    """

    def __init__(self, dim: int = 10, hidden: int = 128, out_dim: int = 10,
                 attributes: Sequence[str] = ATTRIBUTES, n_scores: int = SCORE_MAX) -> None:
        super().__init__()
        self.attributes = tuple(attributes)
        self.tables = nn.ModuleList([nn.Embedding(n_scores, dim) for _ in self.attributes])
        self.mlp = nn.Sequential(nn.Linear(dim * len(self.attributes), hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))
        self.out_dim = out_dim

    def forward(self, attributes: torch.Tensor) -> torch.Tensor:
        """[B, 5] LongTensor of scores 1..5 -> [B, D'] float."""
        idx = validate_attributes(attributes).to(self.tables[0].weight.device) - SCORE_MIN
        parts = [table(idx[:, k]) for k, table in enumerate(self.tables)]
        return self.mlp(torch.cat(parts, dim=1))


class ConditionEncoder(nn.Module):
    """The cross-attention context of configurations 2 and 3.

    ``forward(mask_latent [B, 1, h, w], attributes [B, 5] | None) -> context [B, N, context_dim]``:

    - ``mask_context="flat"`` (Mari §2.2): one token, the mask flattened (h w values, ``latent_size`` = h = w)
      followed in config 3 by the attribute embedding: ``[B, 1, h w (+ D')]``; nothing is learned here
      but the attribute embedder, the U-Net's key/value projections read the vector;
    - ``mask_context="pooled"``: ``grid^2`` tokens of the shared :class:`lungsynth.nn.conditioning.MaskTokenizer`
      (2D: a small conv lift, max- and average-pooled to a grid x grid map, projected to D' with learned
      positions), followed in config 3 by the attribute token: ``[B, grid^2 (+ 1), D']``.
    """

    def __init__(self, config: int, dim: int = 10, hidden: int = 128, out_dim: int = 10, grid: int = 4,
                 mask_context: str = "flat", latent_size: int | None = None) -> None:
        super().__init__()
        from lungsynth.nn.conditioning import MaskTokenizer

        self.config = check_config(config)
        if self.config == 1:
            raise ValueError("configuration 1 has no cross-attention context")
        self.mask_context = check_mask_context(mask_context)
        if self.mask_context == "flat" and not latent_size:
            raise ValueError("the flattened mask context needs latent_size (the latent grid's side)")
        self.latent_size = int(latent_size or 0)
        self.mask_tokens = (MaskTokenizer(1, out_dim, grid=grid, spatial_dims=2) if self.mask_context == "pooled"
                            else None)
        self.attributes = AttributeEmbedder(dim, hidden, out_dim) if self.config == 3 else None
        attr_width = out_dim if self.attributes is not None else 0
        self.context_dim = out_dim if self.mask_tokens is not None else self.latent_size ** 2 + attr_width

    def forward(self, mask_latent: torch.Tensor, attributes: torch.Tensor | None = None) -> torch.Tensor:
        if self.attributes is not None and attributes is None:
            raise ValueError("configuration 3 needs attributes [B, 5] (scores 1..5)")
        a = None if self.attributes is None else self.attributes(attributes)
        if self.mask_tokens is not None:
            ctx = self.mask_tokens(mask_latent.float())
            return ctx if a is None else torch.cat([ctx, a[:, None, :]], dim=1)
        side = self.latent_size
        if tuple(mask_latent.shape[1:]) != (1, side, side):
            raise ValueError(f"the flattened mask context was built for [B, 1, {side}, {side}] latent masks, got "
                             f"{tuple(mask_latent.shape)}")
        vec = mask_latent.float().flatten(1)  # [B, h w]: the paper's flattened mask
        return (vec if a is None else torch.cat([vec, a.to(vec)], dim=1))[:, None, :]


# --------------------------------------------------------------------------- the networks


def build_unet(cfg, config: int, latent_channels: int, lung: bool = False, context_dim: int | None = None) -> nn.Module:
    """The denoising 2D U-Net: in = latent + 1 box-mask channel (+ 1 lung channel), out = latent channels.

    Same architecture for the three configurations apart from cross-attention (configs 2, 3, with context width
    ``context_dim``, the :class:`ConditionEncoder`'s; default ``cfg.bbox_ldm.attr_out_dim``), so Table 2 compares
    conditioning only.
    """
    from lungsynth.nn.unets import diffusion_unet

    c = cfg.bbox_ldm
    levels = len(c.unet_channels)
    return diffusion_unet(
        spatial_dims=2, in_channels=latent_channels + 1 + int(lung), out_channels=latent_channels,
        channels=tuple(c.unet_channels), attention_levels=(False,) + (True,) * (levels - 1),
        num_res_blocks=2, num_head_channels=c.unet_channels[-1] // 4 if c.unet_channels[-1] >= 32 else 8,
        cross_attention_dim=int(context_dim or c.attr_out_dim) if check_config(config) > 1 else None)


class PretrainedVQ(nn.Module):
    """A local, frozen diffusers ``VQModel`` (a folder written by ``save_pretrained``: ``config.json`` and
    safetensors weights, never a pickle) behind the course autoencoder's latent API, as Mari et al. use the
    diffusers VQ-VAE (§2.2).

    ``encode_latent``: slices [N, 1, H, W] in [0, 1] -> the pre-quantisation latents [N, C, H/f, W/f] times the
    model's ``scaling_factor`` (latent diffusion diffuses those); ``decode_latent``: quantised to the nearest codes,
    then decoded, averaged over the model's output channels, clipped to [0, 1]. The model sees [-1, 1] repeated to
    its input channels. ``identity`` (its config's digest) is recorded in the runs trained on it.
    """

    def __init__(self, folder: str | Path) -> None:
        import hashlib
        import json

        from diffusers import VQModel

        super().__init__()
        folder = Path(folder)
        config = folder / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"{folder} holds no config.json: --pretrained-vq needs a folder written by "
                                    f"diffusers' VQModel.save_pretrained (config.json and safetensors weights)")
        meta = json.loads(config.read_text())
        if meta.get("_class_name") != "VQModel":
            raise ValueError(f"{config} describes a {meta.get('_class_name')!r}, not a diffusers 'VQModel'; point "
                             f"--pretrained-vq at a VQModel folder (bbox_ldm.pretrained_vq)")
        self.vq = VQModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        self.vq.eval().requires_grad_(False)
        c = self.vq.config
        self.downsample = 2 ** (len(c.block_out_channels) - 1)
        self.latent_channels = int(c.vq_embed_dim or c.latent_channels)
        self.scale_factor = float(c.scaling_factor)
        self.in_channels = int(c.in_channels)
        self.identity = f"diffusers VQModel {hashlib.sha256(config.read_bytes()).hexdigest()[:12]}"

    @torch.no_grad()
    def encode_latent(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """[N, 1, H, W] in [0, 1] -> scaled pre-quantisation latents [N, C, H/f, W/f] (``sample`` is ignored)."""
        h = self.vq.encode((2.0 * x - 1.0).repeat(1, self.in_channels, 1, 1)).latents
        return h * self.scale_factor

    @torch.no_grad()
    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents [N, C, h, w] -> slices [N, 1, f h, f w] in [0, 1] (quantised first, as the paper's)."""
        out = self.vq.decode(z / self.scale_factor).sample
        return ((out.mean(dim=1, keepdim=True) + 1.0) / 2.0).clamp(0.0, 1.0)


def autoencoder(cfg, device: torch.device | str | None = None):
    """The frozen VQ-VAE on ``device`` (default: the runtime's): ``cfg.bbox_ldm.pretrained_vq``'s diffusers
    ``VQModel`` when set (:class:`PretrainedVQ`), else chapter 02's 2D VQ-VAE (trained when missing)."""
    from lungsynth.autoencoders import ensure_autoencoder

    if cfg.bbox_ldm.pretrained_vq:
        from lungsynth.runtime import device as default_device

        return PretrainedVQ(cfg.bbox_ldm.pretrained_vq).to(device or default_device())
    ae = ensure_autoencoder("vqvae2d", cfg, device=device)
    return ae.eval().requires_grad_(False)


def autoencoder_name(ae) -> str | None:
    """What a run records of its autoencoder: the pretrained model's identity, None for chapter 02's own."""
    return getattr(ae, "identity", None)


@torch.no_grad()
def encode(ae, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Images [N, 1, H, W] in [0, 1] -> diffusion latents [N, C, H/4, W/4] (scaled)."""
    dev = next(ae.parameters()).device
    out = [ae.encode_latent(images[i:i + batch_size].to(dev), sample=False).float().cpu()
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


@torch.no_grad()
def decode(ae, latents: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Latents [N, C, h, w] -> images [N, 1, 4h, 4w] clipped to [0, 1]."""
    dev = next(ae.parameters()).device
    out = [ae.decode_latent(latents[i:i + batch_size].to(dev)).float().cpu()
           for i in range(0, latents.shape[0], batch_size)]
    return torch.cat(out).clamp(0.0, 1.0)
