"""Tiled denoising: the shifted grid cuts the rolled volume into tile-cubes, puts every voxel back where it was,
and moves its borders with the timestep."""

import pytest
import torch

from lungsynth.diffusion.tiling import grid_offsets, shifted_grid, tiled


def pointwise(x, t):
    return x[:, :1] * 2.0 + x[:, 1:2] - 0.01 * t.float().view(-1, *[1] * (x.ndim - 1))


def tile_mean(x, t):
    """Each tile's mean of channel 0, everywhere in the tile: shows where the tiles were."""
    return x[:, :1].mean(dim=tuple(range(2, x.ndim)), keepdim=True).expand(-1, 1, *x.shape[2:])


def test_a_pointwise_net_gives_the_whole_volume_output_exactly():
    x = torch.randn(2, 3, 16, 24, 8)
    t = torch.tensor([5, 5])
    torch.testing.assert_close(shifted_grid(pointwise, x, t, 8), pointwise(x, t))


def test_tiles_are_cubes_of_the_rolled_volume():
    x = torch.randn(1, 2, 16, 16, 16)
    t = torch.tensor([11])
    shapes = []

    def recording(part, steps):
        shapes.append(tuple(part.shape))
        assert bool((steps == 11).all())
        return tile_mean(part, steps)

    out = shifted_grid(recording, x, t, 8, batch=3)
    assert [s[0] for s in shapes] == [3, 3, 2] and {s[1:] for s in shapes} == {(2, 8, 8, 8)}
    shifts = grid_offsets(11, 3, 8)
    rolled_in, rolled_out = torch.roll(x, shifts, (2, 3, 4)), torch.roll(out, shifts, (2, 3, 4))
    for i in (0, 8):
        for j in (0, 8):
            for k in (0, 8):
                block = (0, 0, slice(i, i + 8), slice(j, j + 8), slice(k, k + 8))
                torch.testing.assert_close(rolled_out[block], rolled_in[block].mean().expand(8, 8, 8))


def test_offsets_move_with_the_timestep_and_repeat_for_the_same_step():
    offsets = {grid_offsets(t, 3, 48) for t in range(25)}
    assert len(offsets) > 20 and all(0 <= v < 48 for o in offsets for v in o)
    assert grid_offsets(7, 3, 48) == grid_offsets(7, 3, 48)


def test_tiled_picks_the_grid_the_window_or_the_whole_volume():
    x = torch.randn(1, 2, 16, 16, 16)
    t = torch.tensor([3])
    sizes = []

    def recording(part, steps):
        sizes.append(tuple(part.shape[2:]))
        return pointwise(part, steps)

    for tile, expected in ((0, {(16, 16, 16)}), (16, {(16, 16, 16)}), (8, {(8, 8, 8)}), (12, {(12, 12, 12)})):
        sizes.clear()
        torch.testing.assert_close(tiled(recording, x, t, tile), pointwise(x, t), rtol=1e-5, atol=1e-5)
        assert set(sizes) == expected, tile
    with pytest.raises(ValueError, match="one timestep"):
        tiled(pointwise, torch.randn(2, 2, 16, 16, 16), torch.tensor([3, 4]), 8)
    with pytest.raises(ValueError, match="multiples"):
        shifted_grid(pointwise, x, t, 12)


def test_tile_borders_keep_away_from_the_voxels_to_avoid():
    """A nodule of 6 voxels in a 96^3 volume: at every step the grid's borders (rolled by the offset) pass at least
    the margin away from it on every axis, and the offsets still vary from step to step."""
    avoid = torch.zeros(96, 96, 96, dtype=torch.bool)
    lo = (40, 10, 70)
    avoid[lo[0]:lo[0] + 6, lo[1]:lo[1] + 6, lo[2]:lo[2] + 6] = True
    seen = set()
    for t in range(25):
        offsets = grid_offsets(t, 3, 48, avoid, margin=3)
        seen.add(offsets)
        for axis, o in enumerate(offsets):
            borders = {(k - o) % 96 for k in (0, 48)}
            assert all(p <= lo[axis] - 3 or p >= lo[axis] + 6 + 3 for p in borders), (t, axis, o)
    assert len(seen) > 20
