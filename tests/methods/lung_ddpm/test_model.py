"""Chapter 06, Lung-DDPM's model room: the layout, its encodings and checks, the cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch
from lung_ddpm_toys import S, toy_batch

from lungsynth.config import get_config
from lungsynth.methods import lung_ddpm as ld


def test_layout_labels_and_channels(toy_data):
    d = toy_data[0]
    layout = ld.make_layout(d["lung"][None], d["label"][None])
    assert set(torch.unique(layout).tolist()) == {0.0, 1.0, 2.0}
    assert bool((layout[d["label"][None] > 0] == 2).all())  # the nodule overrides the lung
    onehot = ld.layout_channels(layout, True)
    assert onehot.shape == (1, 3, S, S, S) and torch.equal(onehot.sum(1), torch.ones(1, S, S, S))
    no_lung = ld.layout_channels(layout, False)
    assert no_lung.shape == (1, 2, S, S, S)
    lung_only = layout == 1
    assert bool((no_lung[:, :1][lung_only] == 1).all())  # lung voxels are background without the lung layout
    scaled = ld.layout_channels(layout, True, "scaled")
    assert set(torch.unique(scaled).tolist()) == {-1.0, 0.0, 1.0}


def test_bad_layout_and_reference_are_value_errors(toy_data):
    ct, layout = toy_batch(toy_data)
    bad = layout.clone()
    bad[0, 0, 0, 0, 0] = 3
    with pytest.raises(ValueError, match="besides the three labels"):
        ld.check_layout(bad)
    with pytest.raises(ValueError, match="besides the three labels"):
        ld.check_layout(layout * 0.5)
    with pytest.raises(ValueError, match=r"expected \[B, 1, D, H, W\]"):
        ld.check_layout(layout[:, 0])
    with pytest.raises(ValueError, match="does not match the layout"):
        ld.check_reference(ct[..., :8], layout)
    with pytest.raises(ValueError, match=r"\[0, 1\] scale"):
        ld.check_reference(ct * 1000 - 1000, layout)


def test_cosine_schedule_matches_hand_computation():
    cfg = get_config("full")
    sched = ld.build_scheduler(cfg)
    T, s = cfg.lung_ddpm.num_train_timesteps, 0.008
    assert T == 250 and cfg.lung_ddpm.schedule == "cosine"

    def f(t):  # Nichol & Dhariwal 2021, eq. 17
        return math.cos(((t / T) + s) / (1 + s) * math.pi / 2) ** 2

    ab = sched.alphas_cumprod.double()
    # MONAI's timestep index t carries alpha_bar(t + 1) (index 0 is one step from the data)
    for t in (0, 1, 10, 62, 125, 200, 240, T - 2):
        assert ab[t].item() == pytest.approx(f(t + 1) / f(0), rel=2e-5, abs=1e-7)
    # the same numbers written out (cos^2 evaluated by hand for T = 250, s = 0.008)
    assert ab[0].item() == pytest.approx(0.99980573, rel=1e-6)  # f(1)/f(0)
    assert ab[124].item() == pytest.approx(0.49384359, rel=1e-5)  # f(125)/f(0): half the steps
    assert ab[248].item() == pytest.approx(3.885980e-05, rel=1e-3)  # f(249)/f(0)
    assert sched.betas[-1].item() == pytest.approx(0.999)  # beta clipped at the last step (f(T) = 0)
    assert sched.prediction_type == "epsilon" and sched.clip_sample
