"""Denoiser factories shared by every method chapter.

- :func:`diffusion_unet` builds MONAI's :class:`~monai.networks.nets.DiffusionModelUNet` (2D or 3D,
  optional cross-attention and class embedding) with the course's defaults; bbox-LDM, HR-LDM,
  Lung-DDPM and text2img call it rather than building MONAI U-Nets by hand.
- :class:`LandUNet` is LAND's 3D denoiser: a U-Net of ``len(channels)`` levels (5 in the paper) with
  ``num_res_blocks`` residual blocks per level, cross-attention that re-injects the condition at
  several resolutions, and a ``skip`` switch: ``"additive"`` (LAND: decoder features are *added* to
  the encoder features of the same level) or ``"concat"`` (MONAI/classic U-Net: concatenated on the
  channel axis). Everything else is identical, so :func:`lungsynth.bench` measures the skip choice
  alone. It reuses MONAI's blocks (``DiffusionUNetResnetBlock``, ``SpatialTransformer`` with
  ``CrossAttentionBlock``, ``DiffusionUnetDownsample``, ``WrappedUpsample``,
  ``get_timestep_embedding``); only the wiring of the skips is written here, because MONAI's U-Net
  hard-codes concatenation in its up blocks.

Why additive skips save memory: with concatenation every decoder residual block at width ``c`` reads
a ``2c``-channel tensor (GroupNorm + SiLU + 3^3 conv over 2c channels, plus a 1x1 projection back
to ``c`` for the residual path); with addition it reads ``c`` channels and needs no projection. At
LAND's 64^3 x 4 latents the first decoder level dominates the activation memory.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

SKIPS: tuple[str, ...] = ("additive", "concat")


def _groups(channels: Sequence[int], norm_num_groups: int) -> int:
    """Largest group count <= ``norm_num_groups`` dividing every width (tiny test models use 8 or 16)."""
    g = int(norm_num_groups)
    while g > 1 and any(c % g for c in channels):
        g -= 1
    return g


def diffusion_unet(spatial_dims: int, in_channels: int, out_channels: int,
                   channels: Sequence[int] = (32, 64, 64), num_res_blocks: int | Sequence[int] = 2,
                   attention_levels: Sequence[bool] | None = None, cross_attention_dim: int | None = None,
                   num_class_embeds: int | None = None, num_head_channels: int | Sequence[int] = 32,
                   norm_num_groups: int = 32, transformer_num_layers: int = 1, resblock_updown: bool = False,
                   use_flash_attention: bool = False, **kwargs) -> nn.Module:
    """MONAI ``DiffusionModelUNet`` with the course defaults.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of ``x_t`` plus any concatenated condition channels.
        out_channels: channels of the prediction (the latent/image channels).
        channels: width per level (each divisible by the group count).
        num_res_blocks: residual blocks per level (int or one per level).
        attention_levels: one bool per level; default attention at the deepest level only.
        cross_attention_dim: context width; switches attention blocks to cross-attention
            (``forward(x, t, context=[B, L, cross_attention_dim])``).
        num_class_embeds: class-conditional (``forward(..., class_labels=[B])``) with this many classes.
        num_head_channels: channels per attention head (clamped to the level width).
        norm_num_groups: GroupNorm groups; lowered automatically to divide every width.
        **kwargs: passed to ``DiffusionModelUNet`` (``upcast_attention``, ``dropout_cattn``, ...).
    Returns:
        the network; ``net(x [B, in, *S], timesteps [B], context=None, class_labels=None) -> [B, out, *S]``.
        Spatial sizes must be divisible by ``2 ** (len(channels) - 1)``.
    """
    from monai.networks.nets import DiffusionModelUNet

    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    channels = tuple(int(c) for c in channels)
    if attention_levels is None:
        attention_levels = tuple(i == len(channels) - 1 for i in range(len(channels)))
    attention_levels = tuple(bool(a) for a in attention_levels)
    if len(attention_levels) != len(channels):
        raise ValueError(f"attention_levels has {len(attention_levels)} entries for {len(channels)} levels")
    if isinstance(num_head_channels, int):
        num_head_channels = tuple(min(int(num_head_channels), c) for c in channels)
    return DiffusionModelUNet(
        spatial_dims=spatial_dims, in_channels=int(in_channels), out_channels=int(out_channels),
        num_res_blocks=num_res_blocks, channels=channels, attention_levels=attention_levels,
        norm_num_groups=_groups(channels, norm_num_groups), num_head_channels=num_head_channels,
        with_conditioning=cross_attention_dim is not None, cross_attention_dim=cross_attention_dim,
        num_class_embeds=num_class_embeds, transformer_num_layers=transformer_num_layers,
        resblock_updown=resblock_updown, use_flash_attention=use_flash_attention, **kwargs)


class _Attention(nn.Module):
    """MONAI ``SpatialTransformer`` (self-attention, then cross-attention to ``context`` when the
    block has a context width, then a GEGLU MLP); ``[B, C, *S] -> [B, C, *S]``."""

    def __init__(self, spatial_dims: int, channels: int, groups: int, head_channels: int,
                 cross_attention_dim: int | None, use_flash_attention: bool) -> None:
        super().__init__()
        from monai.networks.nets.diffusion_model_unet import SpatialTransformer

        head = min(head_channels, channels)
        self.block = SpatialTransformer(spatial_dims=spatial_dims, in_channels=channels,
                                        num_attention_heads=max(1, channels // head), num_head_channels=head,
                                        norm_num_groups=groups, cross_attention_dim=cross_attention_dim,
                                        use_flash_attention=use_flash_attention)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        return self.block(x, context=context)


class LandUNet(nn.Module):
    """LAND's 3D denoiser with additive (or concatenated) skips and multi-resolution cross-attention.

    Layout (``L = len(channels)`` levels, ``R = num_res_blocks``)::

        conv_in -> for level i: R x [ResBlock(ch_i) (+ Attn)] -> keep each output as a skip
                   -> Downsample (strided conv) except at the last level
        middle:  ResBlock -> Attn -> ResBlock
        for level i from deep to shallow: (Upsample + conv to ch_i, except at the deepest level)
                   R x [merge(h, skip) -> ResBlock(ch_i) (+ Attn)]
        out: GroupNorm -> SiLU -> conv (zero-initialised, as MONAI)

    ``merge`` is ``h + skip`` (additive) or ``cat([h, skip])`` followed by a ResBlock with a 2c input
    and a 1x1 projection on its residual path (concat). Attention blocks sit at the levels where
    ``attention_levels`` is True, in the encoder, the middle and the decoder, so the condition tokens
    are re-injected at every one of those resolutions.

    Args:
        in_channels: latent channels plus concatenated condition channels.
        out_channels: latent channels (the v prediction).
        channels: width per level; the paper's 5 levels.
        num_res_blocks: residual blocks per level (paper: 2).
        attention_levels: one bool per level (default: the three deepest).
        cross_attention_dim: width of the condition tokens; None = self-attention only (unconditional).
        skip: ``"additive"`` or ``"concat"``.
        num_head_channels: channels per attention head.
        norm_num_groups: GroupNorm groups (lowered to divide every width).
        use_flash_attention: PyTorch SDPA inside MONAI's attention blocks.

    Shapes: ``forward(x [B, in, D, H, W], timesteps [B], context [B, N, cross_attention_dim] | None)
    -> [B, out, D, H, W]``; D, H, W divisible by ``2 ** (L - 1)``.
    """

    def __init__(self, in_channels: int, out_channels: int, channels: Sequence[int] = (32, 32, 64, 64, 64),
                 num_res_blocks: int = 2, attention_levels: Sequence[bool] | None = None,
                 cross_attention_dim: int | None = None, skip: str = "additive", num_head_channels: int = 32,
                 norm_num_groups: int = 32, spatial_dims: int = 3, use_flash_attention: bool = False) -> None:
        super().__init__()
        from monai.networks.blocks import Convolution
        from monai.networks.nets.diffusion_model_unet import (DiffusionUNetResnetBlock, DiffusionUnetDownsample,
                                                              WrappedUpsample, zero_module)

        if skip not in SKIPS:
            raise ValueError(f"skip must be one of {SKIPS}, got {skip!r}")
        channels = tuple(int(c) for c in channels)
        n_levels = len(channels)
        if attention_levels is None:
            attention_levels = tuple(i >= n_levels - 3 for i in range(n_levels))
        attention_levels = tuple(bool(a) for a in attention_levels)
        if len(attention_levels) != n_levels:
            raise ValueError(f"attention_levels has {len(attention_levels)} entries for {n_levels} levels")
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, int(in_channels), int(out_channels)
        self.channels, self.num_res_blocks, self.skip = channels, int(num_res_blocks), skip
        self.attention_levels, self.cross_attention_dim = attention_levels, cross_attention_dim
        groups = _groups(channels, norm_num_groups)
        temb = channels[0] * 4

        def conv(cin: int, cout: int, k: int = 3) -> nn.Module:
            return Convolution(spatial_dims=spatial_dims, in_channels=cin, out_channels=cout, strides=1,
                               kernel_size=k, padding=k // 2, conv_only=True)

        def res(cin: int, cout: int) -> nn.Module:
            return DiffusionUNetResnetBlock(spatial_dims, cin, temb, cout, norm_num_groups=groups)

        def attn(c: int) -> nn.Module:
            return _Attention(spatial_dims, c, groups, num_head_channels, cross_attention_dim, use_flash_attention)

        self.conv_in = conv(self.in_channels, channels[0])
        self.time_embed = nn.Sequential(nn.Linear(channels[0], temb), nn.SiLU(), nn.Linear(temb, temb))

        self.down_res, self.down_attn, self.downsamplers = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        prev = channels[0]
        for i, c in enumerate(channels):
            self.down_res.append(nn.ModuleList([res(prev if r == 0 else c, c) for r in range(num_res_blocks)]))
            self.down_attn.append(nn.ModuleList([attn(c) if attention_levels[i] else nn.Identity()
                                                 for _ in range(num_res_blocks)]))
            self.downsamplers.append(DiffusionUnetDownsample(spatial_dims, c, use_conv=True)
                                     if i < n_levels - 1 else nn.Identity())
            prev = c

        self.mid_res1, self.mid_attn, self.mid_res2 = res(prev, prev), attn(prev), res(prev, prev)

        self.up_res, self.up_attn, self.upsamplers = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(n_levels)):
            c = channels[i]
            if i == n_levels - 1:
                self.upsamplers.append(nn.Identity())
            else:
                # nearest x2 then a 3^3 conv from the deeper width to this level's width
                self.upsamplers.append(WrappedUpsample(
                    spatial_dims=spatial_dims, mode="nontrainable", in_channels=channels[i + 1],
                    out_channels=channels[i + 1], interp_mode="nearest", scale_factor=2.0, align_corners=None,
                    post_conv=conv(channels[i + 1], c)))
            cin = 2 * c if skip == "concat" else c
            self.up_res.append(nn.ModuleList([res(cin, c) for _ in range(num_res_blocks)]))
            self.up_attn.append(nn.ModuleList([attn(c) if attention_levels[i] else nn.Identity()
                                               for _ in range(num_res_blocks)]))

        self.out = nn.Sequential(nn.GroupNorm(groups, channels[0], eps=1e-6), nn.SiLU(),
                                 zero_module(conv(channels[0], self.out_channels)))

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def _check(self, x: torch.Tensor, context: torch.Tensor | None) -> None:
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"LandUNet expects x of shape [B, {self.in_channels}, D, H, W], got {tuple(x.shape)}")
        f = self.downsample_factor
        if any(s % f for s in x.shape[2:]):
            raise ValueError(f"LandUNet with {len(self.channels)} levels needs spatial sizes divisible by {f}, "
                             f"got {tuple(x.shape[2:])}")
        if context is not None:
            if self.cross_attention_dim is None:
                raise ValueError("this LandUNet was built without cross-attention (cross_attention_dim=None); "
                                 "pass context=None")
            if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] != self.cross_attention_dim:
                raise ValueError(f"context must be [B={x.shape[0]}, N, {self.cross_attention_dim}], "
                                 f"got {tuple(context.shape)}")
        elif self.cross_attention_dim is not None:
            raise ValueError(f"this LandUNet cross-attends to condition tokens: pass context "
                             f"[B, N, {self.cross_attention_dim}]")

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        from monai.networks.nets.diffusion_model_unet import get_timestep_embedding

        self._check(x, context)
        t = torch.as_tensor(timesteps, device=x.device).reshape(-1)
        if t.numel() == 1 and x.shape[0] > 1:
            t = t.expand(x.shape[0])
        emb = self.time_embed(get_timestep_embedding(t, self.channels[0]).to(x.dtype))
        h = self.conv_in(x)
        skips: list[torch.Tensor] = []
        for res_blocks, attn_blocks, down in zip(self.down_res, self.down_attn, self.downsamplers):
            for rb, ab in zip(res_blocks, attn_blocks):
                h = rb(h, emb)
                if not isinstance(ab, nn.Identity):
                    h = ab(h, context)
                skips.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
        h = self.mid_res2(self.mid_attn(self.mid_res1(h, emb), context), emb)
        for up, res_blocks, attn_blocks in zip(self.upsamplers, self.up_res, self.up_attn):
            if not isinstance(up, nn.Identity):
                h = up(h)
            for rb, ab in zip(res_blocks, attn_blocks):
                s = skips.pop()
                h = h + s if self.skip == "additive" else torch.cat([h, s], dim=1)
                del s
                h = rb(h, emb)
                if not isinstance(ab, nn.Identity):
                    h = ab(h, context)
        return self.out(h)


def land_unet(in_channels: int, out_channels: int, channels: Sequence[int] = (32, 32, 64, 64, 64),
              num_res_blocks: int = 2, attention_levels: Sequence[bool] | None = None,
              cross_attention_dim: int | None = None, skip: str = "additive", **kwargs) -> LandUNet:
    """Factory for :class:`LandUNet` (same arguments); the name other chapters import."""
    return LandUNet(in_channels, out_channels, channels, num_res_blocks, attention_levels, cross_attention_dim,
                    skip, **kwargs)


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def activation_bytes(module: nn.Module, *args, **kwargs) -> int:
    """Sum of the bytes of every leaf-module output in one forward pass (no grad): a device-independent
    proxy of a network's activation footprint, used by tests to compare skip variants.

    Args: the forward's inputs. Returns: bytes (int).
    """
    total = 0

    def hook(_m, _inp, out):
        nonlocal total
        if torch.is_tensor(out):
            total += out.numel() * out.element_size()

    handles = [m.register_forward_hook(hook) for m in module.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            module(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return total
