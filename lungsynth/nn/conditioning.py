"""Masks to the latent grid and condition encoders shared by the method chapters.

LAND (chapter 03) conditions a latent denoiser on an anatomical mask given at image resolution
(the prepared ``cond`` volume: background 0, lung 0.5, nodule texture t in 1..5, all divided by 5).
The mask reaches the latent grid (x4 smaller per axis) in one of two ways:

- :func:`mask_to_latent_grid` — 3D max-pooling by the autoencoder's factor (LAND-Mask). Max, not
  mean, so a nodule smaller than one latent voxel still shows, and because the nodule values
  (0.2..1) are larger than the lung value (0.1) a latent voxel touching a nodule carries the
  nodule's texture.
- :func:`encode_mask_latent` — through the encoder of the mask VAE of chapter 02 (LAND-LatentMask):
  a learned, multi-channel summary of the mask at the latent resolution.

Either way the grid is concatenated to ``z_t`` *and* turned into tokens by :class:`MaskTokenizer`
for the denoiser's cross-attention layers.

Token design (our choice; the paper does not specify it): a 3^3 convolution lifts the grid mask to
``hidden`` features, adaptive max- and average-pooling bring them to a fixed ``grid^3`` lattice
(max keeps a small nodule visible in its cell, average measures how much lung the cell holds), a
linear layer projects the ``2 * hidden`` pooled features to the context width, and a learned
position embedding tells the attention which cell a token came from. The token count is
``grid^3`` whatever the volume size, so cross-attention costs ``O(N_voxels * grid^3)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# The prepared LAND condition (lungsynth.data, notes/DATA_API.md): value = class / 5.
COND_SCALE = 5.0
LUNG_VALUE = 0.5 / COND_SCALE  # 0.1
NODULE_THRESHOLD = 0.15  # between the lung value (0.1) and the smallest nodule value (texture 1 -> 0.2)
TEXTURES: tuple[int, ...] = (1, 2, 3, 4, 5)


def cond_levels() -> torch.Tensor:
    """The values a prepared condition volume may hold: 0, 0.1 (lung), 0.2 .. 1.0 (texture 1..5)."""
    return torch.tensor([0.0, LUNG_VALUE] + [t / COND_SCALE for t in TEXTURES])


def nodule_mask(cond: torch.Tensor) -> torch.Tensor:
    """Binary nodule mask (float 0/1) of a condition volume; same shape."""
    return (cond > NODULE_THRESHOLD).to(torch.float32)


def lung_mask(cond: torch.Tensor) -> torch.Tensor:
    """Binary lung-or-nodule mask (float 0/1) of a condition volume; same shape."""
    return (cond > LUNG_VALUE / 2).to(torch.float32)


def texture_map(cond: torch.Tensor) -> torch.Tensor:
    """Texture class per voxel (0 outside nodules, 1..5 inside), long; same shape."""
    t = torch.round(cond.float() * COND_SCALE).long()
    return torch.where(cond > NODULE_THRESHOLD, t, torch.zeros_like(t))


def mask_to_latent_grid(mask: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """LAND-Mask: 3D max-pool by ``factor`` (kernel = stride = factor).

    Args:
        mask: [B, C, D, H, W] (C = 1 for the condition volume), D/H/W divisible by ``factor``.
    Returns:
        [B, C, D/f, H/f, W/f], same dtype.
    """
    if mask.ndim != 5:
        raise ValueError(f"mask must be [B, C, D, H, W], got shape {tuple(mask.shape)}")
    if any(s % factor for s in mask.shape[2:]):
        raise ValueError(f"mask spatial size {tuple(mask.shape[2:])} is not divisible by the latent factor {factor}")
    return F.max_pool3d(mask, kernel_size=factor, stride=factor)


def encode_mask_latent(mask: torch.Tensor, mask_vae: Any, sample: bool = False,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """LAND-LatentMask: the mask VAE's latent mean (or a sample) of a mask volume.

    Args:
        mask: [B, 1, D, H, W] in the mask VAE's input scale (the prepared condition volume).
        mask_vae: a module with ``encode(x) -> (mean, std)`` (MONAI ``AutoencoderKL``) or
            ``encode(x) -> mean``; kept frozen by the caller.
        sample: draw ``mean + std * eps`` instead of the mean.
    Returns:
        [B, C_latent, D/f, H/f, W/f].
    """
    with torch.no_grad():
        out = mask_vae.encode(mask)
    if isinstance(out, (tuple, list)):
        mean, std = out[0], out[1] if len(out) > 1 else None
    else:
        mean, std = out, None
    if sample and std is not None:
        eps = torch.randn(mean.shape, generator=generator, device=generator.device if generator else mean.device)
        return mean + std * eps.to(mean.device)
    return mean


class MaskTokenizer(nn.Module):
    """Condition tokens for cross-attention from a latent-grid mask (see the module docstring).

    Args:
        in_channels: channels of the grid mask (1 for LAND-Mask, the mask VAE's latent channels for
            LAND-LatentMask).
        context_dim: token width (the U-Net's ``cross_attention_dim``).
        grid: tokens per axis (``grid^3`` tokens).
        hidden: width of the convolutional lift.
        spatial_dims: 3 (LAND) or 2.

    Shapes: ``[B, in_channels, *S] -> [B, grid^spatial_dims, context_dim]``.
    """

    def __init__(self, in_channels: int, context_dim: int, grid: int = 4, hidden: int = 32,
                 spatial_dims: int = 3) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.in_channels, self.context_dim, self.grid, self.spatial_dims = in_channels, context_dim, grid, spatial_dims
        self.lift = nn.Sequential(conv(in_channels, hidden, 3, padding=1), nn.SiLU(), conv(hidden, hidden, 3, padding=1))
        self.proj = nn.Linear(2 * hidden, context_dim)
        self.pos = nn.Parameter(torch.randn(grid**spatial_dims, context_dim) * 0.02)
        self.norm = nn.LayerNorm(context_dim)

    @property
    def num_tokens(self) -> int:
        return self.grid**self.spatial_dims

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        if mask.ndim != self.spatial_dims + 2 or mask.shape[1] != self.in_channels:
            raise ValueError(f"MaskTokenizer expects [B, {self.in_channels}, *spatial] with {self.spatial_dims} "
                             f"spatial dims, got {tuple(mask.shape)}")
        h = self.lift(mask)
        if self.spatial_dims == 3:
            pooled = torch.cat([F.adaptive_max_pool3d(h, self.grid), F.adaptive_avg_pool3d(h, self.grid)], 1)
        else:
            pooled = torch.cat([F.adaptive_max_pool2d(h, self.grid), F.adaptive_avg_pool2d(h, self.grid)], 1)
        tokens = pooled.flatten(2).transpose(1, 2)  # [B, grid^d, 2*hidden]
        return self.norm(self.proj(tokens) + self.pos)


# --------------------------------------------------------------------------- mask editing (LAND, chapter 08)


def _as5d(cond: torch.Tensor) -> tuple[torch.Tensor, int]:
    c = torch.as_tensor(cond, dtype=torch.float32)
    nd = c.ndim
    while c.ndim < 5:
        c = c.unsqueeze(0)
    if c.ndim != 5 or c.shape[1] != 1:
        raise ValueError(f"condition volume must be [D,H,W], [1,D,H,W] or [B,1,D,H,W], got {tuple(cond.shape)}")
    return c, nd


def _back(c: torch.Tensor, nd: int) -> torch.Tensor:
    while c.ndim > nd:
        c = c.squeeze(0)
    return c


def set_texture(cond: torch.Tensor, texture: int) -> torch.Tensor:
    """Give every nodule voxel texture ``texture`` (1 ground-glass .. 5 solid); lung and background kept.

    Args: cond [D,H,W] / [1,D,H,W] / [B,1,D,H,W] on the prepared scale. Returns: same shape.
    """
    if int(texture) not in TEXTURES or float(texture) != int(texture):
        raise ValueError(f"texture must be an integer 1..5 (1 ground-glass, 3 part-solid, 5 solid), got {texture}")
    c, nd = _as5d(cond)
    out = torch.where(c > NODULE_THRESHOLD, torch.full_like(c, int(texture) / COND_SCALE), c)
    return _back(out, nd)


def move_nodule(cond: torch.Tensor, shift: tuple[int, int, int]) -> torch.Tensor:
    """Translate the nodule voxels by ``shift`` (voxels along D, H, W); the old place becomes lung.

    Raises ValueError when the volume has no nodule or the moved nodule would leave the volume.
    Returns: same shape as ``cond``.
    """
    c, nd = _as5d(cond)
    nod = c > NODULE_THRESHOLD
    if not bool(nod.any()):
        raise ValueError("move_nodule: the condition volume has no nodule voxel (values > 0.15) to move")
    idx = nod.nonzero()[:, 2:]
    lo, hi = idx.min(0).values, idx.max(0).values
    size = torch.tensor(c.shape[2:])
    s = torch.tensor([int(v) for v in shift])
    if bool(((lo + s) < 0).any()) or bool(((hi + s) >= size).any()):
        raise ValueError(f"move_nodule: shift {tuple(shift)} moves the nodule (bounding box {lo.tolist()}.."
                         f"{hi.tolist()}) outside the volume of size {size.tolist()}")
    out = torch.where(nod, torch.full_like(c, LUNG_VALUE), c)
    moved_vals = torch.roll(torch.where(nod, c, torch.zeros_like(c)), shifts=tuple(s.tolist()), dims=(2, 3, 4))
    out = torch.where(moved_vals > 0, moved_vals, out)
    return _back(out, nd)


def resize_nodule(cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Scale the nodules about their joint centroid by ``scale`` (nearest-neighbour; textures kept).

    Shrinking leaves lung where nodule voxels were. Returns: same shape as ``cond``.
    """
    if not scale > 0:
        raise ValueError(f"resize_nodule: scale must be > 0, got {scale}")
    c, nd = _as5d(cond)
    nod = c > NODULE_THRESHOLD
    if not bool(nod.any()):
        raise ValueError("resize_nodule: the condition volume has no nodule voxel (values > 0.15) to resize")
    out = c.clone()
    for b in range(c.shape[0]):
        vals = torch.where(nod[b, 0], c[b, 0], torch.zeros_like(c[b, 0]))
        if not bool(nod[b].any()):
            continue
        centre = nod[b, 0].nonzero().float().mean(0)
        grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in c.shape[2:]], indexing="ij")
        src = [torch.round(centre[k] + (grids[k] - centre[k]) / float(scale)).long() for k in range(3)]
        inside = torch.ones_like(grids[0], dtype=torch.bool)
        for k, n in enumerate(c.shape[2:]):
            inside &= (src[k] >= 0) & (src[k] < n)
            src[k] = src[k].clamp(0, n - 1)
        new = torch.where(inside, vals[src[0], src[1], src[2]], torch.zeros_like(vals))
        base = torch.where(nod[b, 0], torch.full_like(vals, LUNG_VALUE), c[b, 0])
        out[b, 0] = torch.where(new > 0, new, base)
    return _back(out, nd)
