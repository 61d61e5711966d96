"""Denoising a volume in tiles: a network trained on cubes run on cubes of a larger volume at every reverse step.

Two ways, both with one timestep for the whole batch:

- :func:`shifted_grid`: the volume cut into non-overlapping ``tile``-cubes after rolling it by an offset per axis
  drawn from the timestep, so the tile borders move from step to step and no voxel sits on a border at every
  step. Each voxel is denoised once a step: as cheap as the whole volume. The offsets can be kept so that no
  border runs through given voxels (Lung-DDPM: the layout's nodules; on the course gates, with borders free to
  cross them, DDIM kept 20 of 28 nodules at half their contrast, with them kept off 24, as overlapping windows).
  Written here because MONAI's ``sliding_window_inference`` has no shifted grid; it needs every side to be a
  multiple of ``tile``.
- MONAI's ``sliding_window_inference`` (overlap 0.25, Gaussian blending) for any other size: every voxel near a
  border is denoised twice or more (27 tiles of 48^3 for a 96^3 volume, 3.4x its voxels).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

Net = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def grid_offsets(t: int, dims: int, tile: int, avoid: torch.Tensor | None = None,
                 margin: int = 3) -> tuple[int, ...]:
    """The roll of every spatial axis at timestep ``t``, seeded by ``t`` (the same step in every run gets the same
    offsets, so samples stay reproducible from their seed): uniform in ``[0, tile)``, or, with ``avoid`` [*S]
    (bool), drawn among the offsets whose tile borders pass no nearer than ``margin`` voxels to an ``avoid``
    voxel along that axis (those cutting the fewest such positions when none is clear)."""
    rng = np.random.default_rng([int(t), int(tile), 104729])
    offsets = []
    for axis in range(dims):
        if avoid is None:
            offsets.append(int(rng.integers(0, tile)))
            continue
        size = avoid.shape[axis]
        along = avoid.any(dim=tuple(a for a in range(dims) if a != axis)).cpu().numpy()
        # a border at position p (between voxels p - 1 and p) is near when p - margin .. p + margin - 1 hold one
        near = np.array([along[np.arange(p - margin, p + margin) % size].any() for p in range(size)])
        # rolled by o, the borders lie at positions k * tile - o of the volume
        cost = np.array([near[(np.arange(0, size, tile) - o) % size].sum() for o in range(tile)])
        offsets.append(int(rng.choice(np.flatnonzero(cost == cost.min()))))
    return tuple(offsets)


def shifted_grid(net: Net, x: torch.Tensor, t: torch.Tensor, tile: int, batch: int = 4,
                 avoid: torch.Tensor | None = None) -> torch.Tensor:
    """``net`` on the non-overlapping ``tile``-cubes of ``x`` rolled by :func:`grid_offsets`, rolled back.

    Args: x [B, C, *S] with every side of S a multiple of ``tile``; t [B], one timestep; ``batch`` tiles per
    call of ``net``; ``avoid`` [*S] (bool): voxels the tile borders keep away from (see :func:`grid_offsets`).
    Returns [B, C_out, *S].
    """
    spatial = tuple(x.shape[2:])
    if any(s % tile for s in spatial):
        raise ValueError(f"shifted_grid: sides {spatial} are not multiples of the tile {tile}")
    dims, b, c = len(spatial), x.shape[0], x.shape[1]
    axes = tuple(range(2, 2 + dims))
    shifts = grid_offsets(int(t.reshape(-1)[0]), dims, tile, avoid)
    counts = [s // tile for s in spatial]
    split = [b, c] + [v for k in counts for v in (k, tile)]
    # [B, C, k1, T, k2, T, ...] -> [B, k1, k2, ..., C, T, T, ...] -> [B * k1 * k2 ..., C, T, ...]
    order = [0] + [2 + 2 * i for i in range(dims)] + [1] + [3 + 2 * i for i in range(dims)]
    tiles = torch.roll(x, shifts, axes).reshape(split).permute(order).reshape(-1, c, *(tile,) * dims)
    steps = t.reshape(-1)[:1]
    out = torch.cat([net(part, steps.expand(part.shape[0])) for part in tiles.split(batch)])
    c_out = out.shape[1]
    out = out.reshape(b, *counts, c_out, *(tile,) * dims)
    back = [0, 1 + dims] + [v for i in range(dims) for v in (1 + i, 2 + dims + i)]
    return torch.roll(out.permute(back).reshape(b, c_out, *spatial), tuple(-s for s in shifts), axes)


def sliding_window(net: Net, x: torch.Tensor, t: torch.Tensor, tile: int, batch: int = 4) -> torch.Tensor:
    """``net`` on overlapping ``tile``-cubes of ``x`` [B, C, *S] (MONAI, overlap 0.25, Gaussian blending)."""
    from monai.inferers import sliding_window_inference

    steps = t.reshape(-1)[:1]
    return sliding_window_inference(x, (tile,) * (x.ndim - 2), batch,
                                    lambda part: net(part, steps.expand(part.shape[0])), overlap=0.25,
                                    mode="gaussian")


def tiled(net: Net, x: torch.Tensor, t: torch.Tensor, tile: int, avoid: torch.Tensor | None = None) -> torch.Tensor:
    """``net(x, t)`` in ``tile``-cubes: :func:`shifted_grid` (borders away from ``avoid`` [*S]) where every side
    is a multiple of ``tile``, else :func:`sliding_window`; the whole volume at once when ``tile`` is 0 or no
    smaller than every side."""
    if tile <= 0 or all(s <= tile for s in x.shape[2:]):
        return net(x, t)
    steps = t.reshape(-1)
    if not bool((steps == steps[0]).all()):
        raise ValueError("tiled denoising needs one timestep for the whole batch")
    if all(s % tile == 0 for s in x.shape[2:]):
        return shifted_grid(net, x, t, tile, avoid=avoid)
    return sliding_window(net, x, t, tile)
