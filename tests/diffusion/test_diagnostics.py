"""diffusion.diagnostics: the relative error of a denoiser's one-step x0 estimate."""

import pytest
import torch

from lungsynth.diffusion.diagnostics import relative_x0_error
from lungsynth.diffusion.objectives import eps_from_x0, v_target
from lungsynth.diffusion.schedules import alpha_bar_at, make_scheduler


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 2, 6, 6, generator=g) * torch.tensor([1.0, 3.0])[None, :, None, None] + 2.0


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_an_oracle_scores_zero_and_the_mean_scores_one(prediction):
    x0 = _data()
    sched = make_scheduler("ddpm", 1000, "linear", prediction)
    mean = x0.mean(dim=(0, 2, 3), keepdim=True)

    def output_for(target_x0):
        def fn(x_t, t):
            ab = alpha_bar_at(sched, t, like=x_t)
            eps = eps_from_x0(x_t, target_x0.expand_as(x_t), ab)
            return eps if prediction == "epsilon" else v_target(target_x0.expand_as(x_t), eps, ab)
        return fn

    oracle = relative_x0_error(output_for(x0), sched, x0, [100, 900])
    assert all(v == pytest.approx(0.0, abs=1e-6) for v in oracle.values())
    guess = relative_x0_error(output_for(mean), sched, x0, [100, 900])
    assert all(v == pytest.approx(1.0, rel=1e-3) for v in guess.values())


def test_a_small_epsilon_error_is_a_large_x0_error_at_high_noise():
    x0 = _data()
    sched = make_scheduler("ddpm", 1000, "linear", "epsilon")

    def slightly_off(x_t, t):  # the true noise plus 5% of x_t: an epsilon MSE of ~2.5e-3
        ab = alpha_bar_at(sched, t, like=x_t)
        return eps_from_x0(x_t, x0, ab) + 0.05 * x_t

    err = relative_x0_error(slightly_off, sched, x0, [100, 900])
    assert err[100] < 0.01 and err[900] > 1.0  # harmless at low noise, worse than the mean at t = 900


def test_concat_channels_reach_the_denoiser():
    x0 = _data()
    sched = make_scheduler("ddpm", 1000, "linear", "v_prediction")
    seen = {}

    def fn(x, t, context=None):
        seen["channels"], seen["context"] = x.shape[1], context
        return torch.zeros(x.shape[0], 2, *x.shape[2:])

    relative_x0_error(fn, sched, x0, [500], condition={"concat": torch.ones(8, 1, 6, 6), "context": "c"})
    assert seen == {"channels": 3, "context": "c"}
