"""LAND (chapter 03) model room: loss maths, condition validation, condition volumes and grids, mask edits."""

import math

import numpy as np
import pytest
import torch
from land_tiny import phantom_cond, tiny_cfg

from lungsynth.methods import land
from lungsynth.nn.conditioning import (MaskTokenizer, mask_to_latent_grid, move_nodule, nodule_mask,
                                       resize_nodule, set_texture, texture_map)


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


def test_uniform_weighting_is_the_plain_v_mse():
    """The course's departure: every timestep weighs 1, so high noise (SNR -> 0) is not weighted away."""
    cfg = tiny_cfg()
    assert land.loss_gamma(cfg) is None and cfg.land.loss_weighting == "uniform"
    assert land.loss_gamma(tiny_cfg(**{"land.loss_weighting": "min-snr"})) == 5.0
    with pytest.raises(ValueError, match="allowed: min-snr, uniform"):
        tiny_cfg(**{"land.loss_weighting": "snr"})
    bad = tiny_cfg()
    bad.land.loss_weighting = "snr"  # set past the config's check
    with pytest.raises(ValueError, match="loss_weighting must be one of"):
        land.loss_gamma(bad)
    sched = land.make_scheduler(land.denoiser_spec(cfg, "none", 4))
    ab = sched.alphas_cumprod.double()
    t = torch.tensor([10, 900])
    z0, noise = torch.full((2, 4, 2, 2, 2), 0.5), torch.full((2, 4, 2, 2, 2), -1.0)
    out = land.land_loss(ZeroDenoiser(), sched, z0, None, gamma=None, timesteps=t, noise=noise)
    v = [(-ab[k].sqrt() - 0.5 * (1 - ab[k]).sqrt()).item() for k in t.tolist()]
    assert out["loss"].item() == pytest.approx(sum(x * x for x in v) / 2, rel=1e-4)
    assert out["snr_weight"].item() == 1.0
    weighted = land.land_loss(ZeroDenoiser(), sched, z0[1:], None, gamma=5.0, timesteps=t[1:], noise=noise[1:])
    assert weighted["snr_weight"].item() < 1e-3  # Min-SNR at t = 900: about SNR, 3e-4


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
    grid = land.condition_grid(cond, "nodule-only")
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


def test_land_mask_carries_the_lung_and_nodule_only_does_not():
    """LAND-Mask is lung + nodule max-pooled (the poster's Volumetric Conditioning); the ablation drops the lung."""
    cond = phantom_cond(32, (9, 9, 9), 2, texture=2)  # lung 4..28: the corner latent voxels hold background only
    lung = (cond > 0.05) & (cond < 0.15)
    nodule = cond > 0.15
    mask, ablation = land.condition_grid(cond, "mask"), land.condition_grid(cond, "nodule-only")
    assert torch.allclose(mask.unique(), torch.tensor([0.0, 0.1, 1.0]))  # no texture, but the lung
    expected = torch.maximum(torch.nn.functional.max_pool3d(nodule.float(), 4),
                             0.1 * torch.nn.functional.max_pool3d(lung.float(), 4))
    assert torch.allclose(mask, expected)
    assert torch.equal(ablation, torch.nn.functional.max_pool3d(nodule.float(), 4))
    assert not torch.equal(mask, ablation)  # they differ exactly where the lung is
    cfg = tiny_cfg(16)
    channels = {v: land.denoiser_spec(cfg, v, 4)["cond_channels"] for v in land.VARIANTS}
    assert channels == {"none": 0, "nodule-only": 1, "mask": 1, "latentmask": cfg.autoencoders.mask_latent_channels,
                        "latentmask-texture": cfg.autoencoders.mask_latent_channels}
    assert land.denoiser_spec(cfg, "mask", 4)["condition"] == "nodule+lung"


def test_a_checkpoint_is_refused_for_another_variant_or_condition(tmp_path):
    cfg = tiny_cfg(16)
    spec = land.denoiser_spec(cfg, "mask", 4)
    land.check_trained_for(spec, "mask", tmp_path, cfg)  # trained for it: no error
    with pytest.raises(ValueError, match="holds LAND variant 'mask', not 'nodule-only'"):
        land.check_trained_for(spec, "nodule-only", tmp_path, cfg)
    old = {k: v for k, v in spec.items() if k != "condition"}  # "mask" before it carried the lung
    with pytest.raises(ValueError, match="before LAND-Mask included the lung.*lungsynth land train --variant mask"):
        land.check_trained_for(old, "mask", tmp_path, cfg)


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


def test_a_run_of_another_loss_weighting_is_refused(tmp_path):
    import json

    run = tmp_path / "03_land_mask"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"results": {}}))  # made before the setting existed: Min-SNR
    with pytest.raises(ValueError, match="loss_weighting='min-snr'.*--fresh"):
        land.check_loss_weighting(run, tiny_cfg(), "mask")
    land.check_loss_weighting(run, tiny_cfg(**{"land.loss_weighting": "min-snr"}), "mask")
    (run / "run.json").write_text(json.dumps({"results": {"loss_weighting": "uniform"}}))
    land.check_loss_weighting(run, tiny_cfg(), "mask")


def test_a_run_on_other_autoencoder_weights_is_refused(tmp_path, monkeypatch):
    """LAND's run records the digests of the autoencoders it was trained on; retraining the vae3d (or, for the
    latentmask variants, the mask VAE) afterwards makes ensure_trained refuse the run with the command to retrain."""
    import json

    monkeypatch.setenv("LUNGSYNTH_HOME", str(tmp_path / "home"))
    cfg = tiny_cfg()
    for kind, data in (("vae3d", b"weights A"), ("maskvae", b"mask weights")):
        folder = tmp_path / "home" / "runs" / cfg.profile / f"02_{kind}"
        folder.mkdir(parents=True)
        (folder / "final.pt").write_bytes(data)
    digests = land.autoencoder_digests(cfg, "latentmask")
    assert set(digests) == {"vae3d", "maskvae"} and set(land.autoencoder_digests(cfg, "mask")) == {"vae3d"}
    run = tmp_path / "03_land_latentmask"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"results": {}}))  # a run older than the record: not checked
    land.check_autoencoders(run, cfg, "latentmask")
    (run / "run.json").write_text(json.dumps({"results": {"autoencoder_weights": digests}}))
    land.check_autoencoders(run, cfg, "latentmask")
    (tmp_path / "home" / "runs" / cfg.profile / "02_maskvae" / "final.pt").write_bytes(b"retrained mask weights")
    with pytest.raises(ValueError, match="other maskvae weights.*--fresh"):
        land.check_autoencoders(run, cfg, "latentmask")
    (tmp_path / "home" / "runs" / cfg.profile / "02_vae3d" / "final.pt").write_bytes(b"weights B")
    with pytest.raises(ValueError, match="other maskvae and vae3d weights"):
        land.check_autoencoders(run, cfg, "latentmask")
