"""Chapter 06, Lung-DDPM's evaluate room: the seam ratio and a metrics row."""

from __future__ import annotations

import pytest
import torch
from lung_ddpm_toys import S, tiny_cfg, toy_batch

from lungsynth.methods import lung_ddpm as ld


def test_seam_ratio(toy_data):
    ct, layout = toy_batch(toy_data)
    lung = ld.generation_mask(layout)
    assert torch.allclose(ld.seam_ratio(ct, ct, lung), torch.ones(2, dtype=torch.float64))
    shell = ld.boundary_shell(lung)
    inner, outer = shell & lung, shell & ~lung
    assert bool(inner.any()) and bool(outer.any())  # the shell straddles the boundary
    assert not bool((shell & ~ld.boundary_shell(lung, 2)).any())  # and grows with the width
    smooth = torch.linspace(0.3, 0.5, S).expand(2, 1, S, S, S).contiguous()  # no edge at the lung boundary
    seamed = torch.where(lung, smooth + 0.2, smooth)  # a pasted region with an intensity step: a seam
    assert bool((ld.seam_ratio(seamed, smooth, lung) > 5).all())
    with pytest.raises(ValueError, match="no boundary"):
        ld.seam_ratio(ct, ct, torch.zeros_like(lung))


def test_metrics_row(toy_data):
    cfg = tiny_cfg()
    ct, layout = toy_batch(toy_data, 3)
    noisy = (ct + 0.05 * torch.randn(ct.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    row = ld.metrics(cfg, noisy, ct, layout)
    assert set(row) >= {"fid", "mmd", "masked_mse", "seam_ratio", "n", "features"}
    assert row["n"] == 3 and row["masked_mse"] > 0 and row["seam_ratio"] > 1
    same = ld.metrics(cfg, ct, ct, layout)
    assert same["masked_mse"] == 0 and same["seam_ratio"] == pytest.approx(1.0) and same["fid"] == pytest.approx(0, abs=1e-6)
