"""lungsynth/diffusion/objectives.py: v target, conversions, Min-SNR weights, masked losses."""

import math

import numpy as np
import pytest
import torch

from lungsynth.diffusion.objectives import (add_noise_masked, diffusion_loss, eps_from_v, masked_l1, min_snr_weights,
                                            min_snr_weights_for, per_sample_loss, predicted_eps, predicted_x0,
                                            target, target_for, v_from_eps, v_target, x0_from_eps, x0_from_v)
from lungsynth.diffusion.schedules import add_noise, make_scheduler


def test_v_target_hand_computed():
    # linear schedule, T = 1000, t = 500: alpha_bar = prod_{i<=500} (1 - beta_i), betas = linspace(1e-4, 2e-2)
    betas = np.linspace(1e-4, 2e-2, 1000)
    ab = float(np.prod(1 - betas[:501]))
    sched = make_scheduler("ddpm", 1000, "linear", "v")
    x0 = torch.full((1, 1, 2, 2), 2.0)
    eps = torch.full((1, 1, 2, 2), 0.5)
    v = target_for(sched, x0, eps, torch.tensor([500]))
    expected = math.sqrt(ab) * 0.5 - math.sqrt(1 - ab) * 2.0
    assert torch.allclose(v, torch.full_like(v, expected), atol=1e-5)
    assert torch.allclose(v, sched.get_velocity(x0, eps, torch.tensor([500])), atol=1e-6)  # MONAI agrees


def test_min_snr_weights_hand_computed():
    s = torch.tensor([0.5, 5.0, 20.0])
    assert torch.allclose(min_snr_weights(s, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.25]))
    assert torch.allclose(min_snr_weights(s, 5.0, "v_prediction"), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 21]))
    assert torch.allclose(min_snr_weights(s, 5.0, "sample"), torch.tensor([0.5, 5.0, 5.0]))
    with pytest.raises(ValueError):
        min_snr_weights(s, 0.0)


def test_min_snr_weights_for_scheduler():
    sched = make_scheduler("ddpm", 1000, "linear", "v")
    t = torch.tensor([0, 999])
    ab = sched.alphas_cumprod[t].double()
    snr = ab / (1 - ab)
    w = min_snr_weights_for(sched, t, 5.0).double()
    assert torch.allclose(w, torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr + 1), rtol=1e-4)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_conversions_roundtrip(pred):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    ab = torch.tensor([0.99, 0.7, 0.3, 0.01])
    xt = ab.sqrt().view(-1, 1, 1, 1) * x0 + (1 - ab).sqrt().view(-1, 1, 1, 1) * eps
    out = target(pred, x0, eps, ab)
    assert torch.allclose(predicted_x0(pred, out, xt, ab), x0, atol=1e-4)
    assert torch.allclose(predicted_eps(pred, out, xt, ab), eps, atol=1e-4)


def test_v_conversions_explicit():
    x0, eps = torch.randn(2, 1, 4), torch.randn(2, 1, 4)
    ab = torch.tensor([0.8, 0.2])
    a = ab.sqrt().view(-1, 1, 1)
    s = (1 - ab).sqrt().view(-1, 1, 1)
    xt = a * x0 + s * eps
    v = v_target(x0, eps, ab)
    assert torch.allclose(v, a * eps - s * x0)
    assert torch.allclose(x0_from_v(xt, v, ab), x0, atol=1e-6)
    assert torch.allclose(eps_from_v(xt, v, ab), eps, atol=1e-6)
    assert torch.allclose(v_from_eps(xt, eps, ab), v, atol=1e-5)
    assert torch.allclose(x0_from_eps(xt, eps, ab), x0, atol=1e-5)


def test_masked_losses_normalised_by_mask_sum():
    pred = torch.zeros(2, 2, 4, 4)
    tgt = torch.zeros(2, 2, 4, 4)
    tgt[0, :, :2] = 3.0  # error only in the top half of sample 0
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, :, :2] = 1.0  # mask = exactly that region
    mask[1, :, 0, 0] = 1.0
    per = per_sample_loss(pred, tgt, mask, "l1")
    assert torch.allclose(per, torch.tensor([3.0, 0.0]))
    assert masked_l1(pred, tgt, mask).item() == pytest.approx(1.5)
    assert per_sample_loss(pred, tgt, None, "l2")[0].item() == pytest.approx(9.0 / 2)
    w = torch.tensor([2.0, 1.0])
    assert diffusion_loss(pred, tgt, w, mask, "l1").item() == pytest.approx((2 * 3.0 + 0.0) / 2)
    # empty mask contributes 0 instead of NaN
    assert per_sample_loss(pred, tgt, torch.zeros(2, 1, 4, 4), "l1").tolist() == [0.0, 0.0]


def test_loss_errors():
    with pytest.raises(ValueError, match="mask of shape"):
        diffusion_loss(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), mask=torch.ones(2, 1, 3, 3))
    with pytest.raises(ValueError, match="differ in shape"):
        diffusion_loss(torch.zeros(2, 1, 4), torch.zeros(2, 1, 5))
    with pytest.raises(ValueError, match="not finite"):
        diffusion_loss(torch.full((1, 1, 2), float("nan")), torch.zeros(1, 1, 2))
    with pytest.raises(ValueError, match="weights"):
        diffusion_loss(torch.zeros(2, 1, 2), torch.zeros(2, 1, 2), weights=torch.ones(3))


def test_lesion_only_noise():
    sched = make_scheduler("ddpm", 100, "linear")
    x0, n = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    m = torch.zeros(1, 1, 4, 4)
    m[..., 1:3, 1:3] = 1
    t = torch.tensor([60])
    out = add_noise_masked(sched, x0, n, t, m)
    assert torch.equal(out[..., 0, 0], x0[..., 0, 0])
    assert torch.allclose(out[..., 1:3, 1:3], add_noise(sched, x0, n, t)[..., 1:3, 1:3])
