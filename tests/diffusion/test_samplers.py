"""lungsynth/diffusion/samplers.py: DDPM/DDIM loops, guidance, re-anchoring and AAS callbacks."""

import pytest
import torch

from lungsynth.diffusion.objectives import target
from lungsynth.diffusion.samplers import (BackgroundAnchor, anatomically_aware, cfg_combine, sample, step,
                                          timestep_pairs)
from lungsynth.diffusion.schedules import alpha_bar_at, make_scheduler

SHAPE = (2, 1, 6, 6, 6)


def oracle(scheduler, x_star):
    """The exact denoiser of a point-mass data distribution at x_star, in the scheduler's parameterisation."""
    def fn(x, t, **_):
        ab = alpha_bar_at(scheduler, t, like=x).view(-1, 1, 1, 1, 1)
        eps = (x - ab.sqrt() * x_star) / (1 - ab).sqrt()
        return target(scheduler.prediction_type, x_star.expand_as(x), eps, ab.view(-1))
    return fn


@pytest.mark.parametrize("kind,steps,pred,schedule", [
    ("ddpm", 50, "epsilon", "cosine"),      # all steps (Lung-DDPM style)
    ("ddpm", 10, "v_prediction", "linear"),  # respaced DDPM
    ("ddim", 10, "v_prediction", "linear"),  # LAND style
    ("ddim", 7, "epsilon", "scaled_linear"),  # T not a multiple of the steps
])
def test_loops_recover_the_data_point(kind, steps, pred, schedule):
    sched = make_scheduler(kind, 50, schedule, pred)
    x_star = torch.linspace(-0.8, 0.8, 216).view(1, 1, 6, 6, 6)
    g = torch.Generator().manual_seed(0)
    out = sample(oracle(sched, x_star), sched, SHAPE, steps, generator=g, progress=False)
    assert out.shape == SHAPE
    assert torch.allclose(out, x_star.expand(SHAPE), atol=1e-3)


def test_step_matches_monai_where_monai_is_consistent():
    g = torch.Generator().manual_seed(1)
    x, out = torch.randn(1, 1, 5, 5, generator=g), torch.randn(1, 1, 5, 5, generator=g)
    ddpm = make_scheduler("ddpm", 100, "linear", "epsilon")
    ddpm.set_timesteps(100)
    for t in (99, 40, 1, 0):
        a, a0 = ddpm.step(out, t, x, generator=torch.Generator().manual_seed(t))
        b, b0 = step(ddpm, out, t, t - 1, x, generator=torch.Generator().manual_seed(t))
        assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a0, b0, atol=1e-5)
    ddim = make_scheduler("ddim", 100, "cosine", "v_prediction")
    ddim.set_timesteps(10)
    for t in (99, 45, 5):
        a, _ = ddim.step(out, t, x, eta=0.7, generator=torch.Generator().manual_seed(t))
        b, _ = step(ddim, out, t, t - 10, x, eta=0.7, generator=torch.Generator().manual_seed(t))
        assert torch.allclose(a, b, atol=1e-5)


def test_timestep_pairs_end_at_clean_sample():
    sched = make_scheduler("ddim", 250, "cosine")
    pairs = timestep_pairs(sched, 20)
    assert pairs[0][0] == 249 and pairs[-1] == (0, -1) and len(pairs) == 20
    assert all(p == n for (_, p), (n, _) in zip(pairs[:-1], pairs[1:]))
    with pytest.raises(ValueError, match="num_inference_steps"):
        timestep_pairs(sched, 251)


def test_guidance_one_is_exactly_conditional():
    sched = make_scheduler("ddim", 20, "linear", "epsilon")
    calls = []

    def fn(x, t, label):
        calls.append(label)
        return torch.tanh(x) * label

    kw = dict(shape=(1, 1, 4, 4), num_inference_steps=5, progress=False)
    a = sample(fn, sched, generator=torch.Generator().manual_seed(0), condition={"label": 0.3}, **kw)
    b = sample(fn, sched, generator=torch.Generator().manual_seed(0), condition={"label": 0.3},
               uncond_condition={"label": 0.0}, guidance_scale=1.0, **kw)
    assert torch.equal(a, b) and 0.0 not in calls  # no unconditional call at scale 1
    c = torch.randn(3)
    assert cfg_combine(c, torch.randn(3), 1.0) is c
    stats: dict = {}
    d = sample(fn, sched, generator=torch.Generator().manual_seed(0), condition={"label": 0.3},
               uncond_condition={"label": 0.0}, guidance_scale=3.0, stats=stats, **kw)
    assert stats["nfe"] == 10 and not torch.equal(a, d)
    e = sample(lambda x, t, label: torch.tanh(x) * torch.as_tensor(label).view(-1, 1, 1, 1), sched,
               generator=torch.Generator().manual_seed(0), condition={"label": torch.tensor([0.3])},
               uncond_condition={"label": torch.tensor([0.0])}, guidance_scale=3.0, cfg_batch=True, **kw)
    assert torch.allclose(d, e, atol=1e-6)
    with pytest.raises(ValueError, match="uncond"):
        sample(fn, sched, condition={"label": 1.0}, guidance_scale=2.0, **kw)


def test_concat_condition_and_intermediates():
    sched = make_scheduler("ddpm", 10, "linear")
    seen = []

    def fn(x, t):
        seen.append(x.shape[1])
        return torch.zeros_like(x[:, :1])

    out, inter = sample(fn, sched, (2, 1, 4, 4), generator=torch.Generator().manual_seed(0),
                        condition={"concat": torch.ones(1, 2, 4, 4)}, intermediates_every=4, progress=False)
    assert set(seen) == {3} and out.shape == (2, 1, 4, 4)
    assert [i["step"] for i in inter] == [4, 8, 10] and inter[-1]["timestep"] == -1
    assert torch.equal(inter[-1]["sample"], out)
    with pytest.raises(ValueError, match="x_T"):
        sample(fn, sched, (2, 1, 4, 4), x_T=torch.zeros(1, 1, 4, 4), progress=False)


def _toy(x, t, **_):
    return 0.3 * torch.sin(x)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_background_anchor_final_background_is_exact(kind):
    sched = make_scheduler(kind, 40, "scaled_linear", "epsilon")
    bg = torch.randn(1, 4, 8, 8, 8, generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(1, 1, 8, 8, 8)
    mask[..., 2:5, 2:6, 3:6] = 1.0
    anchor = BackgroundAnchor(bg, mask, sched, generator=torch.Generator().manual_seed(9))
    out = sample(_toy, sched, (1, 4, 8, 8, 8), 8, generator=torch.Generator().manual_seed(0),
                 step_callback=anchor, progress=False)
    outside = (mask == 0).expand_as(out)
    assert torch.equal(out[outside], bg[outside])
    assert not torch.allclose(out[~outside], bg[~outside])  # the model generated inside
    clean = BackgroundAnchor(bg, mask.bool(), sched, noise_background=False)
    mid = clean(torch.zeros_like(bg), 20, 15)
    assert torch.equal(mid[outside], bg[outside]) and (mid[~outside] == 0).all()


@pytest.mark.parametrize("noise_background", [True, False])
def test_noise_background_sets_the_intermediate_states_outside_the_mask(noise_background):
    """Both settings end on the background exactly; along the way noise_background=True anchors to
    q(x_bg, t-1) = sqrt(ab) x_bg + sqrt(1 - ab) eps (a fresh eps from the anchor's generator per step),
    False to x_bg itself. Each case checks its own rule and that the other setting's states differ."""
    sched = make_scheduler("ddim", 40, "scaled_linear", "epsilon")
    bg = torch.randn(1, 4, 8, 8, 8, generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(1, 1, 8, 8, 8)
    mask[..., 2:5, 2:6, 3:6] = 1.0
    outside = (mask == 0).expand_as(bg)

    def run(nb):
        anchor = BackgroundAnchor(bg, mask, sched, generator=torch.Generator().manual_seed(9), noise_background=nb)
        return sample(_toy, sched, bg.shape, 8, generator=torch.Generator().manual_seed(0), step_callback=anchor,
                      intermediates_every=1, progress=False)

    out, inter = run(noise_background)
    _, other = run(not noise_background)
    g = torch.Generator().manual_seed(9)
    if noise_background:
        torch.randn(bg.shape, generator=g)  # the anchor's first draw noised the background for x_T (on_start)
    assert len(inter) == 8 and inter[-1]["timestep"] == -1
    for it in inter[:-1]:
        x = it["sample"][outside]
        if noise_background:
            ab = float(sched.alphas_cumprod[it["timestep"]])
            eps = torch.randn(bg.shape, generator=g)
            assert torch.allclose(x, (ab**0.5 * bg + (1 - ab) ** 0.5 * eps)[outside], atol=1e-5), it["timestep"]
        else:
            assert torch.equal(x, bg[outside]), it["timestep"]
    for mine, theirs in zip(inter[:-1], other[:-1]):  # the two settings differ at every intermediate step ...
        noise_sd = (1 - float(sched.alphas_cumprod[mine["timestep"]])) ** 0.5  # by about the noise: E|N(0,1)| = 0.8
        gap = (mine["sample"][outside] - theirs["sample"][outside]).abs().mean()
        assert gap > 0.5 * noise_sd, mine["timestep"]
    assert torch.equal(out[outside], bg[outside])  # ... and agree at the end
    assert torch.equal(other[-1]["sample"][outside], bg[outside])
    assert not torch.allclose(out[~outside], bg[~outside])  # the model generated inside


def test_aas_leaves_reference_outside_lung():
    sched = make_scheduler("ddpm", 25, "cosine", "epsilon")
    ref = torch.rand(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    lung = torch.zeros(2, 1, 8, 8, 8)
    lung[:, :, 1:7, 1:4, 1:7] = 1
    lung[:, :, 1:7, 5:7, 1:7] = 1
    aas = anatomically_aware(ref, lung, sched, blend_from=25, generator=torch.Generator().manual_seed(4))
    out = sample(_toy, sched, (2, 1, 8, 8, 8), generator=torch.Generator().manual_seed(0), step_callback=aas,
                 progress=False)
    assert torch.equal(out[lung == 0], ref[lung == 0])
    assert not torch.allclose(out[lung == 1], ref[lung == 1])
    # blend_from: steps with t > blend_from are not anchored
    late = anatomically_aware(ref, lung, sched, blend_from=5)
    x = torch.zeros_like(ref)
    assert torch.equal(late(x, 10, 9, x), x)
    with pytest.raises(ValueError, match="mask"):
        BackgroundAnchor(ref, lung[:, :, :4], sched)
