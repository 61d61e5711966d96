"""lungsynth/diffusion/schedules.py: schedule values against hand-computed formulas."""

import math

import numpy as np
import pytest
import torch

from lungsynth.diffusion.schedules import (add_noise, alpha_bar_at, alphas_cumprod, canonical_prediction_type,
                                           make_scheduler, sample_timesteps, snr)


def test_linear_betas_are_monai_linspace():
    s = make_scheduler("ddpm", 1000, "linear")
    b = s.betas.double().numpy()
    assert b[0] == pytest.approx(1e-4, rel=1e-6) and b[-1] == pytest.approx(2e-2, rel=1e-6)
    assert np.allclose(np.diff(b), (2e-2 - 1e-4) / 999, atol=1e-9)


def test_scaled_linear_endpoints_hr_ldm():
    s = make_scheduler("ddpm", 1000, "scaled_linear", beta_start=0.0015, beta_end=0.0195)
    b = s.betas.double().numpy()
    assert b[0] == pytest.approx(0.0015, rel=1e-6)
    assert b[-1] == pytest.approx(0.0195, rel=1e-6)
    # scaled linear = linear in sqrt(beta)
    r = np.sqrt(b)
    assert np.allclose(np.diff(r), (math.sqrt(0.0195) - math.sqrt(0.0015)) / 999, atol=1e-7)
    # defaults are the HR-LDM values
    d = make_scheduler("ddim", 1000, "scaled_linear").betas.double().numpy()
    assert np.allclose(d, b)


def test_cosine_matches_improved_ddpm_formula():
    T, s_ = 250, 0.008
    sched = make_scheduler("ddpm", T, "cosine")

    def f(t):
        return math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2

    # MONAI convention: alphas_cumprod[i] = f(i+1)/f(0) (index 0 is one noising step in)
    ab = alphas_cumprod(sched).numpy()
    hand = np.array([f(i + 1) / f(0) for i in range(T)])
    betas = 1 - hand[1:] / hand[:-1]
    unclipped = np.flatnonzero(betas < 0.999)  # the last beta is clipped to 0.999
    assert np.allclose(ab[: unclipped[-1] + 2], hand[: unclipped[-1] + 2], rtol=1e-4, atol=1e-6)
    assert float(sched.betas[-1]) == pytest.approx(0.999, rel=1e-6)
    assert (np.diff(ab) < 0).all()


def test_snr_and_alpha_bar_helpers():
    s = make_scheduler("ddpm", 100, "linear")
    t = torch.tensor([0, 10, 99])
    ab = alphas_cumprod(s)[t]
    assert torch.allclose(snr(s, t).double(), ab / (1 - ab), rtol=1e-5)
    assert alpha_bar_at(s, -1).item() == 1.0
    assert alpha_bar_at(s, torch.tensor([5, -1])).tolist()[1] == 1.0


def test_add_noise_matches_formula_and_keeps_scheduler_dtype():
    s = make_scheduler("ddpm", 100, "linear")
    x0 = torch.randn(3, 1, 4, 4)
    n = torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 50, -1])
    xt = add_noise(s, x0.bfloat16(), n.bfloat16(), t)
    assert s.alphas_cumprod.dtype == torch.float32  # not cast to bf16 as MONAI's add_noise would
    ab = alphas_cumprod(s)[50].item()
    xt32 = add_noise(s, x0, n, t)
    assert torch.allclose(xt32[1], math.sqrt(ab) * x0[1] + math.sqrt(1 - ab) * n[1], atol=1e-6)
    assert torch.equal(xt32[2], x0[2])
    assert xt.dtype == torch.bfloat16


def test_bad_input_and_aliases():
    with pytest.raises(ValueError, match="unknown noise schedule"):
        make_scheduler("ddpm", 10, "quadratic")
    with pytest.raises(ValueError, match="cosine schedule has no"):
        make_scheduler("ddpm", 10, "cosine", beta_start=0.1)
    with pytest.raises(ValueError, match="scheduler kind"):
        make_scheduler("pndm", 10)
    with pytest.raises(ValueError, match="prediction type"):
        make_scheduler("ddpm", 10, prediction_type="score")
    assert canonical_prediction_type("v") == "v_prediction"
    assert make_scheduler("ddim", 10, "linear", "x0").prediction_type == "sample"


def test_sample_timesteps_range_and_seed():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = sample_timesteps(64, 250, g1), sample_timesteps(64, 250, g2)
    assert torch.equal(a, b) and a.min() >= 0 and a.max() < 250 and a.dtype == torch.long
