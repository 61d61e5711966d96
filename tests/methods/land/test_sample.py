"""LAND (chapter 03) sample room: conditioning at sampling time, DDIM and DDPM from one checkpoint
(the tiny LAND-Mask run of ``conftest.py``)."""

import pytest
import torch
from land_tiny import phantom_cond

from lungsynth.methods import land


def test_conditioning_changes_the_sample_where_the_mask_changed(trained_mask_run):
    from lungsynth.diffusion.samplers import sample as reverse

    cfg, run = trained_mask_run
    den = land.load_denoiser(run)
    sched = land.make_scheduler(den.spec, "ddim")
    a = torch.zeros(1, 1, 8, 8, 8)
    a[..., 1:3, 1:3, 1:3] = 1
    b = torch.zeros(1, 1, 8, 8, 8)
    b[..., 5:7, 5:7, 5:7] = 1
    outs = [reverse(lambda x, t, **kw: den(x, t, **kw), sched, (1, 4, 8, 8, 8), 10,
                    generator=torch.Generator().manual_seed(1), condition={"concat": g, "grid": g}, progress=False)
            for g in (a, b)]
    diff = (outs[0] - outs[1]).abs().mean(1)[0]
    changed = (a != b)[0, 0]
    # 16 of 512 latent voxels changed; the samples differ mostly there (same seed, same noise)
    assert diff[changed].mean() > 2 * diff[~changed].mean()


def test_ddim_and_ddpm_sample_from_the_same_checkpoint(trained_mask_run):
    from lungsynth.autoencoders import build_autoencoder

    cfg, run = trained_mask_run
    torch.manual_seed(0)
    model = land.LandModel("mask", land.load_denoiser(run), build_autoencoder("vae3d", cfg).eval(), None, cfg, run,
                           torch.device("cpu"))
    cond = phantom_cond(32, (12, 12, 12), 8)
    ddim = land.sample(model, cond, 2, sampler="ddim", seed=0)
    ddpm = land.sample(model, cond, 2, sampler="ddpm", seed=0)  # cfg.land.ddpm_steps (8) respaced DDPM steps
    assert ddim["steps"] == 4 and ddpm["steps"] == 8
    for out in (ddim, ddpm):
        assert out["latents"].shape == (2, 4, 8, 8, 8) and out["ct_hu"].shape == (2, 1, 32, 32, 32)
        assert torch.isfinite(out["latents"]).all()
        assert out["ct_hu"].min() >= -1000 and out["ct_hu"].max() <= 400
    assert not torch.allclose(ddim["latents"], ddpm["latents"])
    # both samplers follow the mask the model was trained on: latents are higher inside the nodule
    for out in (ddim, ddpm):
        z = out["latents"].mean(1)
        inside = torch.zeros(8, 8, 8, dtype=torch.bool)
        inside[3:5, 3:5, 3:5] = True
        assert z[:, inside].mean() > z[:, ~inside].mean()
    with pytest.raises(ValueError, match="not LAND classes"):
        land.sample(model, cond * 0.9, 1)
    with pytest.raises(ValueError, match="unknown sampler"):
        land.sample(model, cond, 1, sampler="euler")
