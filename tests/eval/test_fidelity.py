"""lungsynth/eval/fidelity.py: MS-SSIM settings and diversity, masked errors, HU-histogram JSD, nodule Dice."""

import numpy as np
import pytest
import torch

from lungsynth.eval.fidelity import (hu_histogram, hu_histogram_jsd, mae_hu, masked_mse, ms_ssim, ms_ssim_diversity,
                                     ms_ssim_settings, nodule_dice, psnr, ssim)


def test_ms_ssim_settings_for_small_volumes():
    assert ms_ssim_settings((256, 256))["scales"] == 5
    s64 = ms_ssim_settings((64, 64, 64))
    assert (s64["kernel_size"], s64["scales"]) == (11, 3)
    s32 = ms_ssim_settings((32, 32, 32))
    assert (s32["kernel_size"], s32["scales"]) == (11, 2)
    s16 = ms_ssim_settings((16, 16, 16))
    assert (s16["kernel_size"], s16["scales"]) == (7, 2)
    assert sum(s32["weights"]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="side >= 6"):
        ms_ssim_settings((5, 32, 32))


def test_ms_ssim_identical_and_diversity_on_smoke_size():
    g = torch.Generator().manual_seed(0)
    vols = torch.rand(3, 1, 32, 32, 32, generator=g)
    assert np.allclose(ms_ssim(vols, vols), 1.0, atol=1e-5)
    div = ms_ssim_diversity(vols)
    assert div["n_pairs"] == 3 and div["mean"] < 0.5 and (div["kernel_size"], div["scales"]) == (11, 2)
    same = ms_ssim_diversity(vols[:1].repeat(3, 1, 1, 1, 1))
    assert same["mean"] == pytest.approx(1.0, abs=1e-5)
    img = torch.rand(4, 1, 64, 64, generator=g)
    assert ms_ssim_diversity(img, max_pairs=2)["n_pairs"] == 2
    with pytest.raises(ValueError, match="at least 2"):
        ms_ssim_diversity(vols[:1])


def test_ssim_shrinks_window_for_tiny_volumes():
    a = torch.rand(2, 1, 8, 8, 8)
    assert np.allclose(ssim(a, a), 1.0, atol=1e-5)
    assert (ssim(a, torch.rand(2, 1, 8, 8, 8)) < 0.9).all()


def test_masked_errors_hand_computed():
    pred = np.zeros((2, 1, 4, 4))
    tgt = np.zeros((2, 1, 4, 4))
    tgt[0, 0, 0, :] = 2.0
    mask = np.zeros((2, 1, 4, 4))
    mask[:, :, 0, :2] = 1
    assert masked_mse(pred, tgt, mask).tolist() == [4.0, 0.0]
    assert masked_mse(pred, tgt).tolist() == [1.0, 0.0]
    assert mae_hu(pred, tgt * 100, mask).tolist() == [200.0, 0.0]
    p = psnr(pred, tgt, data_range=2.0, mask=mask)
    assert p[0] == pytest.approx(0.0) and np.isinf(p[1])
    with pytest.raises(ValueError, match="empty"):
        masked_mse(pred, tgt, np.zeros_like(mask))
    with pytest.raises(ValueError, match="differ in shape"):
        masked_mse(pred, tgt[:, :, :3])
    bad = pred.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        masked_mse(bad, tgt)


def test_hu_histogram_jsd():
    rng = np.random.default_rng(0)
    solid = rng.normal(30, 40, 5000)
    ggo = rng.normal(-650, 60, 5000)
    assert hu_histogram_jsd(solid, solid) == pytest.approx(0.0)
    assert hu_histogram_jsd(solid, rng.normal(30, 40, 5000)) < 0.02
    d = hu_histogram_jsd(solid, ggo)
    assert 0.9 < d <= 1.0 and d == pytest.approx(hu_histogram_jsd(ggo, solid))
    p, edges = hu_histogram(np.array([-3000.0, 1000.0]))  # clipped into the edge bins
    assert p[0] == 0.5 and p[-1] == 0.5 and len(edges) == 41 and edges[0] == -1000 and edges[-1] == 400
    with pytest.raises(ValueError, match="no voxels"):
        hu_histogram(solid[:4], mask=np.zeros(4))


def test_nodule_dice():
    g = np.mgrid[:24, :24, :24]
    ball = ((g - 12) ** 2).sum(0) <= 16
    vol = np.full((24, 24, 24), -850.0)
    vol[ball] = 30.0
    vol[2:4, 2:4, 2:4] = 50.0  # unrelated bright structure far away (ignored)
    none = np.full_like(vol, -850.0)
    shifted = np.roll(ball, 3, axis=0)
    d = nodule_dice(np.stack([vol, none, vol]), np.stack([ball, ball, shifted]).astype(float))
    assert d[0] == pytest.approx(1.0) and d[1] == 0.0 and 0.3 < d[2] < 0.9
    with pytest.raises(ValueError, match="empty"):
        nodule_dice(vol[None], np.zeros((1, 24, 24, 24)))


def test_separable_window_matches_monai():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 1, 32, 32, 32, generator=g)
    b = (a + 0.2 * torch.rand(2, 1, 32, 32, 32, generator=g)).clamp(0, 1)
    assert np.allclose(ms_ssim(a, b), ms_ssim(a, b, backend="monai"), atol=1e-5)
    assert np.allclose(ssim(a, b), ssim(a, b, backend="monai"), atol=1e-5)
    a2, b2 = a[:, :, 0].repeat(1, 1, 2, 2), b[:, :, 0].repeat(1, 1, 2, 2)  # 2D, 64 x 64, 3 scales
    assert np.allclose(ms_ssim(a2, b2), ms_ssim(a2, b2, backend="monai"), atol=1e-5)
