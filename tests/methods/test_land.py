"""LAND (chapter 03): loss maths, conditioning, samplers from one checkpoint, mask validation and edits.

Tiny sizes throughout: 16^3 or 32^3 "images", 3-level U-Nets, synthetic latents (no prepared data,
no trained autoencoders).
"""

import math

import numpy as np
import pytest
import torch

from lungsynth.config import get_config
from lungsynth.engine import Trainer
from lungsynth.methods import land
from lungsynth.nn.conditioning import (MaskTokenizer, mask_to_latent_grid, move_nodule, nodule_mask,
                                       resize_nodule, set_texture, texture_map)

TINY = {"land.unet_channels": "16,16,16", "land.attention_levels": "False,True,True", "land.context_dim": 16,
        "land.token_grid": 2, "land.token_hidden": 8, "land.num_res_blocks": 1, "land.ddpm_steps": 8,
        "land.ddim_steps": 4, "autoencoders.vae3d_channels": "8,8,8", "autoencoders.maskvae_channels": "8,8,8"}


def tiny_cfg(size=32, **extra):
    return get_config("smoke", {**TINY, "data.size_3d": size, **extra})


def phantom_cond(size=32, lo=(10, 10, 10), side=6, texture=5):
    c = torch.zeros(1, 1, size, size, size)
    m = size // 8
    c[..., m:size - m, m:size - m, m:size - m] = 0.1
    c[..., lo[0]:lo[0] + side, lo[1]:lo[1] + side, lo[2]:lo[2] + side] = texture / 5
    return c


# --------------------------------------------------------------------------- maths


class ZeroDenoiser(torch.nn.Module):
    """Predicts v = 0, so the loss is the weighted mean square of the v target."""

    def forward(self, x, t, grid=None):
        return torch.zeros(x.shape[0], 4, *x.shape[2:])


def test_v_target_and_min_snr_weighted_loss_by_hand():
    cfg = tiny_cfg()
    spec = land.denoiser_spec(cfg, "none", 4)
    sched = land.make_scheduler(spec)
    assert sched.prediction_type == "v_prediction"
    betas = np.linspace(1e-4, 2e-2, 1000)  # the linear schedule, T = 1000
    ab = np.cumprod(1 - betas)
    t = torch.tensor([10, 500])
    z0 = torch.full((2, 4, 2, 2, 2), 0.5)
    noise = torch.full((2, 4, 2, 2, 2), -1.0)
    out = land.land_loss(ZeroDenoiser(), sched, z0, None, gamma=5.0, timesteps=t, noise=noise)
    expected = 0.0
    for k, tk in enumerate(t.tolist()):
        a = ab[tk]
        v = math.sqrt(a) * -1.0 - math.sqrt(1 - a) * 0.5  # v = sqrt(ab) eps - sqrt(1 - ab) x0
        snr = a / (1 - a)
        w = min(snr, 5.0) / (snr + 1.0)  # Min-SNR-5 in v-space
        expected += w * v * v / 2
    assert out["loss"].item() == pytest.approx(expected, rel=1e-4)
    # t = 10 is clamped (SNR >> 5), t = 500 is not (SNR < 5): weights 5/(SNR+1) and SNR/(SNR+1) = ab
    snr10, snr500 = ab[10] / (1 - ab[10]), ab[500] / (1 - ab[500])
    assert snr10 > 5 > snr500
    assert out["snr_weight"].item() == pytest.approx((5 / (snr10 + 1) + ab[500]) / 2, rel=1e-4)


# --------------------------------------------------------------------------- conditions


def test_condition_validation_errors_say_what_is_expected():
    cfg = tiny_cfg(16)
    good = phantom_cond(16, (6, 6, 6), 3, texture=3)
    assert land.check_condition(good, cfg, "latentmask-texture").shape == (1, 1, 16, 16, 16)
    assert land.check_condition(good[0, 0], cfg, "mask").shape == (1, 1, 16, 16, 16)
    with pytest.raises(ValueError, match=r"shape \[16,16,16\]"):
        land.check_condition(torch.zeros(1, 1, 32, 32, 32), cfg, "mask")
    with pytest.raises(ValueError, match="not LAND classes"):
        land.check_condition(good * 0.7 + 0.33 * (good > 0), cfg, "latentmask")
    with pytest.raises(ValueError, match="not LAND classes"):
        land.check_condition(good * 2, cfg, "latentmask-texture")
    with pytest.raises(ValueError, match="NaN"):
        land.check_condition(good * float("nan"), cfg, "mask")
    with pytest.raises(ValueError, match="conditions on nodule"):
        land.check_condition(None, cfg, "latentmask-texture")
    with pytest.raises(ValueError, match="unconditional"):
        land.check_condition(good, cfg, "none")
    with pytest.raises(ValueError, match="unknown LAND variant"):
        land.check_condition(good, cfg, "texture")


def test_condition_volumes_and_grids_per_variant():
    cond = phantom_cond(16, (5, 5, 5), 2, texture=2)  # a 2-voxel nodule: smaller than one latent voxel
    grid = land.condition_grid(cond, "mask")
    assert grid.shape == (1, 1, 4, 4, 4) and set(grid.unique().tolist()) == {0.0, 1.0}
    assert grid.sum() >= 1  # max-pooling keeps the small nodule
    lm = land.condition_volume(cond, "latentmask")
    assert torch.allclose(lm.unique(), torch.tensor([0.0, 0.1, 1.0]))  # texture removed
    assert torch.equal(land.condition_volume(cond, "latentmask-texture"), cond)
    assert torch.equal(mask_to_latent_grid(cond), torch.nn.functional.max_pool3d(cond, 4))
    with pytest.raises(ValueError, match="mask VAE"):
        land.condition_grid(cond, "latentmask")
    tokens = MaskTokenizer(1, 16, grid=2, hidden=8)(grid)
    assert tokens.shape == (1, 8, 16)


def test_mask_edits():
    cond = phantom_cond(32, (10, 10, 10), 4, texture=5)
    t1 = set_texture(cond, 1)
    assert texture_map(t1).max() == 1 and torch.equal(nodule_mask(t1), nodule_mask(cond))
    moved = move_nodule(cond, (4, 0, -2))
    assert nodule_mask(moved).sum() == nodule_mask(cond).sum()
    assert moved[0, 0, 14, 10, 8] == 1.0 and moved[0, 0, 10, 12, 12] == pytest.approx(0.1)
    big = resize_nodule(cond, 2.0)
    assert 6 * nodule_mask(cond).sum() < nodule_mask(big).sum() <= 8.5 * nodule_mask(cond).sum()
    with pytest.raises(ValueError, match="outside the volume"):
        move_nodule(cond, (30, 0, 0))
    with pytest.raises(ValueError, match="integer 1..5"):
        set_texture(cond, 6)
    with pytest.raises(ValueError, match="no nodule"):
        move_nodule(torch.zeros(1, 1, 8, 8, 8), (1, 0, 0))


# --------------------------------------------------------------------------- trained tiny models


def _mask_items(n, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        lo = torch.randint(4, 20, (3,), generator=g).tolist()
        grid = land.condition_grid(phantom_cond(size, lo, 8), "mask")[0]
        items.append({"z": (2.0 * grid - 1.0).expand(4, -1, -1, -1).clone(), "grid": grid})
    return items


@pytest.fixture(scope="module")
def trained_mask_run(tmp_path_factory):
    """A tiny LAND-Mask denoiser trained on latents that equal 2 * grid - 1 (the engine writes final.pt)."""
    cfg = tiny_cfg(32)
    spec = land.denoiser_spec(cfg, "mask", 4)
    torch.manual_seed(0)
    task = land.LandTask(spec, cfg.land.min_snr_gamma)
    run = tmp_path_factory.mktemp("land_mask")
    Trainer(run, max_steps=100, lr=3e-3, batch_size=2, progress=False, seed=0).fit(task, _mask_items(24))
    return cfg, run


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
