"""Chapter 02 reconstruction metrics and the x4 resampling baseline, on hand-made volumes."""

import math

import pytest
import torch

from lungsynth.autoencoders import mask_metrics, reconstruction_metrics, resample_baseline


def test_resample_baseline_and_metrics():
    torch.manual_seed(0)
    smooth = torch.ones(1, 1, 16, 16, 16) * 0.3
    for down in ("area", "linear"):
        assert torch.allclose(resample_baseline(smooth, 4, down), smooth)
    x = torch.rand(1, 1, 16, 16, 16)
    assert resample_baseline(x, 4).shape == x.shape
    lung = torch.zeros(1, 16, 16, 16)
    lung[:, 4:12, 4:12, 4:12] = 1
    label = torch.zeros(1, 16, 16, 16)
    label[:, 7:9, 7:9, 7:9] = 1
    cond = 0.1 * lung
    cond[label > 0] = 0.8  # texture 4
    r = x.clone()
    r[0][label > 0] += 0.01  # 14 HU error on the nodule only
    m = reconstruction_metrics(x[0], r[0], lung, label, cond)
    assert m["mae_hu_nodule"] == pytest.approx(14.0, rel=1e-4)
    assert m["mae_hu_nodule_t4"] == pytest.approx(14.0, rel=1e-4)
    assert math.isnan(m["mae_hu_nodule_t1"])
    assert m["mae_hu_lung"] == pytest.approx(14.0 * 8 / 512, rel=1e-3)
    assert m["ssim"] > 0.99 and m["psnr"] > 40
    perfect = mask_metrics(cond, cond)
    assert perfect["mae"] == 0 and perfect["class_accuracy"] == 1 and perfect["nodule_dice"] == 1
