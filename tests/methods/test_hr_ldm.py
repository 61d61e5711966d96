"""Chapter 05 — HR-LDM: histograms, validation, centres, exact re-anchoring, training and inpainting.

Tiny sizes throughout: an untrained 3D KL-VAE from the course factory, synthetic 16^3 nodule crops
(spheres of three HU levels for the three subtypes) and a 48^3 synthetic volume with two lungs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lungsynth.config import get_config
from lungsynth.methods import hr_ldm

TINY = {"data.crop_size": 16, "hr_ldm.unet_channels": (16, 16), "hr_ldm.attention_levels": (False, True), "hr_ldm.num_res_blocks": 1,
        "hr_ldm.context_dim": 16, "hr_ldm.hist_hidden": 16, "hr_ldm.train_steps": 3, "hr_ldm.batch_size": 2,
        "hr_ldm.ddim_steps": 4, "hr_ldm.n_cache": 0, "autoencoders.vae3d_channels": (8, 16, 16),
        "engine.checkpoint_every": 0, "engine.log_every": 1, "hr_ldm.lung_erosion_mm": 1.0}


def _crop(side: int, radius: float, hu_in: float, subtype: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    g = np.indices((side,) * 3) - (side - 1) / 2
    nod = np.sqrt((g**2).sum(0)) <= radius
    hu = rng.normal(-850, 30, (side,) * 3)
    hu[nod] = rng.normal(hu_in, 40, int(nod.sum()))
    core = nod & (hu > -300)
    unit = np.clip((hu + 1000) / 1400, 0, 1).astype(np.float32)
    return {"ct": torch.from_numpy(unit)[None], "hrmask": torch.from_numpy(np.stack([nod, core, nod & ~core])).float(),
            "mask": torch.from_numpy(nod)[None].float(), "subtype_id": subtype, "diameter_mm": 2.0 * radius,
            "nodule_id": f"n{seed}"}


@pytest.fixture(scope="module")
def cfg():
    return get_config("smoke", TINY)


@pytest.fixture(scope="module")
def vae(cfg):
    from lungsynth.autoencoders import build_autoencoder

    torch.manual_seed(0)
    return build_autoencoder("vae3d", cfg).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def crops():
    return [_crop(16, 2.5 + (i % 2), (-50.0, -350.0, -650.0)[i % 3], i % 3, i) for i in range(6)]


@pytest.fixture(scope="module")
def volume():
    g = np.indices((48,) * 3)
    lung = np.zeros((48,) * 3, bool)
    for cx in (14, 34):
        lung |= ((g[0] - 24) ** 2 / 20**2 + (g[1] - 24) ** 2 / 14**2 + (g[2] - cx) ** 2 / 9**2) < 1
    ct = np.where(lung, -850.0, 40.0).astype(np.float32)
    return ct, lung


@pytest.fixture(scope="module")
def runs(cfg, vae, crops, tmp_path_factory):
    root = tmp_path_factory.mktemp("hr_ldm")
    with_hist = hr_ldm.train(cfg, True, root / "hist", vae=vae, crops=crops, progress=False)
    without = hr_ldm.train(cfg, False, root / "nohist", vae=vae, crops=crops, progress=False)
    return with_hist, without


# --------------------------------------------------------------------------- histograms


def test_soft_histogram_sums_to_one_and_has_gradient():
    torch.manual_seed(0)
    x = torch.rand(2, 500, requires_grad=True)
    w = (torch.rand(2, 500) > 0.3).float()
    h = hr_ldm.soft_histogram(x, w, bins=40)
    assert h.shape == (2, 40)
    assert torch.allclose(h.sum(dim=1), torch.ones(2), atol=1e-6)
    (h * torch.arange(40.0)).sum().backward()  # mean bin index: moves when values move
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert x.grad[w == 0].abs().max() == 0  # voxels outside the lesion do not count


def test_soft_histogram_matches_hard_binning_at_centres():
    centres = torch.tensor(hr_ldm.bin_centres(10, (0.0, 1.0)))
    h = hr_ldm.soft_histogram(centres[[0, 0, 3, 9]], bins=10)
    assert h[0] == pytest.approx(0.5, abs=1e-6) and h[3] == pytest.approx(0.25, abs=1e-6)


def test_jsd_zero_for_equal_positive_for_different():
    p = torch.softmax(torch.randn(3, 40, generator=torch.Generator().manual_seed(0)), dim=1)
    q = torch.softmax(torch.randn(3, 40, generator=torch.Generator().manual_seed(1)), dim=1)
    assert torch.allclose(hr_ldm.js_divergence(p, p), torch.zeros(3), atol=1e-6)
    d = hr_ldm.js_divergence(p, q)
    assert (d > 1e-3).all() and (d <= math.log(2) + 1e-6).all()
    one_hot_a, one_hot_b = torch.eye(40)[0], torch.eye(40)[5]
    assert float(hr_ldm.js_divergence(one_hot_a, one_hot_b)) == pytest.approx(math.log(2), abs=1e-4)


def test_hu_histogram_is_normalised_and_clips():
    hu = np.array([-2000.0, -1000.0, 0.0, 399.0, 5000.0])
    h = hr_ldm.hu_histogram(hu)
    assert h.shape == (40,) and h.sum() == pytest.approx(1.0)
    assert h[0] == pytest.approx(0.4) and h[-1] == pytest.approx(0.4)


# --------------------------------------------------------------------------- bad input


def test_bad_subtype_histogram_and_mask_are_errors():
    with pytest.raises(ValueError, match="subtype 3 is not valid"):
        hr_ldm.validate_subtype(3)
    with pytest.raises(ValueError, match="subtype"):
        hr_ldm.validate_subtype(-1)
    with pytest.raises(ValueError, match="40 bins"):
        hr_ldm.validate_histogram(np.full(32, 1 / 32))
    with pytest.raises(ValueError, match="sums to"):
        hr_ldm.validate_histogram(np.full(40, 0.1))
    with pytest.raises(ValueError, match="negative"):
        hr_ldm.validate_histogram(np.r_[-0.5, 1.5, np.zeros(38)])
    lung = np.zeros((8, 8, 8), bool)
    lung[2:6, 2:6, 2:6] = True
    mask = np.zeros_like(lung)
    mask[0:3, 3, 3] = True
    with pytest.raises(ValueError, match="outside the lung"):
        hr_ldm.validate_mask_in_lung(mask, lung)
    hr_ldm.validate_mask_in_lung(mask & lung, lung)


# --------------------------------------------------------------------------- where


def test_centres_fall_inside_the_eroded_lung(volume):
    from scipy import ndimage

    _, lung = volume
    dist = ndimage.distance_transform_edt(lung)
    idx = hr_ldm.candidate_centres(lung, margin_vox=3.0)
    assert len(idx) > 0 and (dist[tuple(idx.T)] > 3.0).all()
    rng = np.random.default_rng(0)
    for _ in range(20):
        c = hr_ldm.sample_centre(lung, radius_mm=4.0, spacing_mm=2.0, rng=rng, erosion_mm=2.0)
        assert dist[c] > 3.0
    with_rim = hr_ldm.candidate_centres(lung, margin_vox=3.0, include_rim=True)
    assert len(with_rim) == int(lung.sum())  # the rim adds every sub-pleural lung voxel, nothing outside
    with pytest.raises(ValueError, match="pleura"):
        hr_ldm.candidate_centres(lung, margin_vox=50.0)


def test_place_mask_centres_the_shape():
    shape = np.ones((3, 3, 5, 2), np.uint8)
    out = hr_ldm.place_mask(shape, 8)
    assert out.shape == (3, 8, 8, 8) and out.sum() == shape.sum()
    idx = np.argwhere(out[0])
    assert np.allclose(idx.mean(0), [3.5, 3.5, 3.5], atol=0.6)


# --------------------------------------------------------------------------- training and sampling


def test_histogram_term_reaches_the_denoiser(cfg, vae, crops):
    trunc = hr_ldm.TruncatedDecoder(vae)
    cache = hr_ldm.build_latent_cache(cfg, crops, vae, trunc)
    assert len(cache) == 6 and cache.subtype_counts() == [2, 2, 2]
    assert cache[0]["hist"].sum() == pytest.approx(1.0, abs=1e-5)
    torch.manual_seed(0)
    net = hr_ldm.HrLdmNet(hr_ldm.net_spec(cfg, vae.latent_channels))
    sched, _ = hr_ldm.make_schedulers(cfg)
    batch = torch.utils.data.default_collate([cache[0], cache[1]])
    t = torch.tensor([10, 500])
    out = hr_ldm.hr_ldm_losses(net, sched, batch, trunc, hist_weight=10.0, timesteps=t)
    assert out["loss_hist"] > 0
    out["loss_hist"].backward()
    grads = [p.grad.abs().sum() for p in net.unet.parameters() if p.grad is not None]
    assert grads and sum(grads) > 0
    assert all(p.grad is None for p in trunc.parameters())  # the decoder copy stays frozen
    base = hr_ldm.hr_ldm_losses(net, sched, batch, None, hist_weight=10.0, timesteps=t)
    assert "loss_hist" not in base and torch.equal(base["loss"], base["loss_eps"])



def test_alpha_bar_weighting_scales_the_histogram_term(cfg, vae, crops):
    """hist_timestep_weighting="alpha_bar": the histogram term of each sample is multiplied by
    alpha_bar_t (tiny at large t), the logged loss_hist stays the unweighted JSD; unknown modes fail."""
    trunc = hr_ldm.TruncatedDecoder(vae)
    cache = hr_ldm.build_latent_cache(cfg, crops, vae, trunc)
    torch.manual_seed(0)
    net = hr_ldm.HrLdmNet(hr_ldm.net_spec(cfg, vae.latent_channels))
    sched, _ = hr_ldm.make_schedulers(cfg)
    batch = torch.utils.data.default_collate([cache[0], cache[1]])
    t, noise = torch.tensor([999, 999]), torch.randn_like(batch["z0"])
    plain = hr_ldm.hr_ldm_losses(net, sched, batch, trunc, 10.0, timesteps=t, noise=noise)
    weighted = hr_ldm.hr_ldm_losses(net, sched, batch, trunc, 10.0, timesteps=t, noise=noise,
                                    hist_timestep_weighting="alpha_bar")
    ab = float(sched.alphas_cumprod[999])
    assert torch.allclose(plain["loss_hist"], weighted["loss_hist"])
    term_plain = (plain["loss"] - plain["loss_eps"]).detach()
    term_weighted = (weighted["loss"] - weighted["loss_eps"]).detach()
    assert float(term_plain) > 0 and float(term_weighted) == pytest.approx(ab * float(term_plain), rel=1e-4)
    with pytest.raises(ValueError, match="hist_timestep_weighting"):
        hr_ldm.hr_ldm_losses(net, sched, batch, trunc, 10.0, timesteps=t, hist_timestep_weighting="snr")


def test_sampling_scheduler_clips_z0_when_asked(cfg):
    from lungsynth.config import apply_overrides

    _, sample = hr_ldm.make_schedulers(cfg)
    assert cfg.hr_ldm.clip_latent == 3.0 and sample.clip_sample and tuple(sample.clip_sample_values) == (-3.0, 3.0)
    _, off = hr_ldm.make_schedulers(apply_overrides(cfg, {"hr_ldm.clip_latent": 0.0}))
    assert not off.clip_sample


@pytest.mark.parametrize("noise_background", [True, False])
def test_background_is_exact_in_latent_space(cfg, vae, runs, noise_background):
    model = hr_ldm.load(cfg, runs[0], vae=vae, device="cpu")
    z_bg = torch.randn(2, 4, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    cond = torch.zeros(2, 3, 4, 4, 4)
    cond[:, 0, 1:3, 1:3, 1:3] = 1
    cond[:, 1, 1:2, 1:3, 1:3] = 1
    z = hr_ldm.inpaint_latent(model, z_bg, cond, [0, 2], np.full(40, 1 / 40), noise_background=noise_background)
    outside = cond[:, :1].expand_as(z) == 0
    assert torch.equal(z[outside], z_bg[outside])
    assert not torch.equal(z[~outside], z_bg[~outside])


def test_train_with_and_without_regulariser_then_inpaint(cfg, vae, runs, crops, volume):
    from lungsynth.engine import read_metrics

    hist_run, nohist_run = runs
    m_hist, m_no = read_metrics(hist_run / "metrics.csv"), read_metrics(nohist_run / "metrics.csv")
    assert "loss_hist" in m_hist and "loss_hist" not in m_no
    assert len(m_hist["step"]) == 3 and np.isfinite(m_hist["loss"]).all()
    assert m_hist["lr"][-1] < m_hist["lr"][0]  # polynomial decay
    assert hr_ldm.ensure_trained(cfg, True, run_dir=hist_run) == hist_run  # final.pt exists: no retraining
    model = hr_ldm.load(cfg, nohist_run, hist_loss=False, vae=vae, device="cpu")
    assert model.hist_loss is False
    library = hr_ldm.NoduleLibrary.from_crops(crops, cfg)
    ct, lung = volume
    res = hr_ldm.inpaint_volume(model, ct, lung, 2, spacing_mm=1.0, library=library, seed=3)
    assert res.ct_hu.shape == ct.shape and res.subtype == 2
    assert np.array_equal(res.ct_hu[res.region == 0], ct[res.region == 0])  # nothing changes outside
    assert res.nodule_mask.any() and lung[res.nodule_mask > 0].all()
    assert res.generated_histogram.sum() == pytest.approx(1.0)
    assert np.isfinite(res.delta_hu_outside)
    with pytest.raises(ValueError, match="subtype"):
        hr_ldm.inpaint_volume(model, ct, lung, 5, spacing_mm=1.0, library=library)
    with pytest.raises(ValueError, match="sums to"):
        hr_ldm.inpaint_volume(model, ct, lung, 0, spacing_mm=1.0, library=library, histogram=np.ones(40))
    outside = tuple(int(v) for v in np.argwhere(~lung)[0])
    with pytest.raises(ValueError, match="outside the lung"):
        hr_ldm.inpaint_volume(model, ct, lung, 0, spacing_mm=1.0, library=library, centre=outside)


def test_cli_parses_verbs():
    from lungsynth.cli import build_parser

    args = build_parser().parse_args(["hr-ldm", "train", "--profile", "smoke", "--no-hist-loss"])
    assert args.verb == "train" and args.no_hist_loss
    args = build_parser().parse_args(["hr-ldm", "inpaint", "--subtype", "ground-glass", "--size-mm", "10,20"])
    assert args.verb == "inpaint" and args.subtype == "ground-glass"
