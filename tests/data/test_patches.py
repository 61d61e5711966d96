"""Random training cubes: where they are cut, and that every key is cut at the same place; nodule crops at 1 mm."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lungsynth.data.patches import LungCubes, coarsen, cube_slices, cut_crop, mask_voxel


def _item() -> dict[str, torch.Tensor]:
    lung = torch.zeros(1, 40, 40, 40)
    lung[0, 4:16, 4:16, 24:36] = 1  # one lung block in a corner
    label = torch.zeros(1, 40, 40, 40)
    label[0, 30:32, 30:32, 30:32] = 7  # a nodule far from it
    ct = torch.arange(40**3, dtype=torch.float32).reshape(1, 40, 40, 40)  # each voxel's value names its place
    return {"ct": ct, "lung": lung, "label": label, "scan_id": "x"}


def test_cubes_are_centred_on_the_lung_or_a_nodule_and_cut_every_key_alike():
    item = _item()
    torch.manual_seed(0)
    cubes = LungCubes([item], ("ct", "lung", "label"), side=8, nodule_share=0.5)
    on_nodule = 0
    for _ in range(200):
        c = cubes[0]
        assert set(c) == {"ct", "lung", "label"} and all(v.shape == (1, 8, 8, 8) for v in c.values())
        # the CT's values say where the cube was cut: lung and label come from the same place
        z, rest = divmod(int(c["ct"][0, 0, 0, 0]), 40 * 40)
        y, x = divmod(rest, 40)
        assert torch.equal(c["ct"], item["ct"][:, z:z + 8, y:y + 8, x:x + 8])
        assert torch.equal(c["lung"], item["lung"][:, z:z + 8, y:y + 8, x:x + 8])
        assert torch.equal(c["label"], item["label"][:, z:z + 8, y:y + 8, x:x + 8])
        has_nodule, has_lung = bool(c["label"].any()), bool(c["lung"].any())
        assert has_nodule or has_lung  # never a cube of the empty air around both
        on_nodule += has_nodule
    assert 0.35 < on_nodule / 200 < 0.65
    only_lung = LungCubes([item], ("ct", "lung"), side=8, nodule_share=0.0)
    assert all(only_lung[0]["lung"].any() for _ in range(50))


def test_cube_helpers_and_bad_share():
    assert mask_voxel(torch.zeros(3, 3, 3, dtype=torch.bool)) is None
    assert cube_slices((10, 10, 10), 4, (0, 9, 5)) == (slice(0, 4), slice(6, 10), slice(3, 7))  # shifted to fit
    small = {"ct": torch.rand(1, 6, 6, 6)}
    assert LungCubes([small], ("ct",), side=8)[0]["ct"].shape == (1, 6, 6, 6)  # no larger than the cube: whole
    with pytest.raises(ValueError, match="nodule_share"):
        LungCubes([small], ("ct",), side=8, nodule_share=1.5)


def test_cut_crop_centres_the_nodule():
    ct = np.full((20, 20, 20), -1000.0, np.float32)
    lab = np.zeros((20, 20, 20), np.uint8)
    lab[9:12, 9:12, 9:12] = 1
    ct[lab > 0] = 50.0
    c, m = cut_crop(ct, lab, (10, 10, 10), spacing_mm=2.0, size=12)
    assert c.shape == (12, 12, 12) and m[5:7, 5:7, 5:7].all() and not m[0].any()
    assert c[6, 6, 6] == pytest.approx(50.0) and c[0, 0, 0] == pytest.approx(-1000.0)


def test_coarsen_removes_detail_finer_than_the_new_grid():

    z, y, x = np.meshgrid(*(np.arange(16),) * 3, indexing="ij")
    checker = np.where((z + y + x) % 2 == 0, 100.0, -100.0).astype(np.float32)
    label = ((z > 4) & (z < 12)).astype(np.uint8)
    ct, lab = coarsen(checker, label, 1.0, 2.0)
    assert ct.shape == lab.shape == (8, 8, 8)
    assert np.abs(ct).max() < 0.2 * np.abs(checker).max()  # a one-voxel pattern cannot survive a 2-voxel grid
    assert set(np.unique(lab)) <= {0, 1} and lab[4, 4, 4] == 1 and lab[0, 4, 4] == 0
    flat, _ = coarsen(np.full((16, 16, 16), -700.0, np.float32), label, 1.0, 2.0)
    assert np.allclose(flat, -700.0)


@pytest.mark.parametrize("radius_mm", [2.5, 5.0])
def test_a_small_nodule_coarsened_and_cut_back_to_1mm_keeps_its_volume_and_shape(radius_mm):
    """Chapter 10 cuts every crop from volumes at the synthetic ones' 2.7 mm, where a 5-10 mm nodule spans 2-4
    voxels. Cut back at 1 mm its mask must stay a ball of about its volume, not the coarse voxels' cubes (with
    nearest neighbours a 5 mm ball came back at 2.3x its volume, Dice 0.58)."""
    n, to_mm, rng = 40, 256 / 96, np.random.default_rng(0)
    t = np.arange(24) - 11.5
    truth = np.sum(np.stack(np.meshgrid(t, t, t, indexing="ij")) ** 2, axis=0) <= radius_mm**2
    ratios, dices = [], []
    for _ in range(8):  # placements off the coarse grid
        centre = rng.uniform(19.0, 20.0, 3)
        ball = np.sum(np.stack(np.meshgrid(*(np.arange(n) - c for c in centre), indexing="ij")) ** 2, 0) <= radius_mm**2
        ct, lab = coarsen(np.where(ball, 40.0, -850.0).astype(np.float32), ball.astype(np.uint8), 1.0, to_mm)
        _, mask = cut_crop(ct, lab, tuple(c / to_mm for c in centre), to_mm, 24)
        ratios.append(mask.sum() / truth.sum())
        dices.append(2 * (mask.astype(bool) & truth).sum() / (mask.sum() + truth.sum()))
    assert 0.7 < np.mean(ratios) < 1.8 and np.mean(dices) > 0.68, (np.mean(ratios), np.mean(dices))
