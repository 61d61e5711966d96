"""Chapter 05 — HR-LDM, the sample room: centres in the eroded lung, shape placement, exact re-anchoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lungsynth.methods import hr_ldm


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
    rim = hr_ldm.candidate_centres(lung, margin_vox=3.0, subpleural=True)
    assert len(rim) + len(idx) == int(lung.sum())  # the rim is the lung minus the inner region, nothing outside
    assert (dist[tuple(rim.T)] <= 3.0).all() and lung[tuple(rim.T)].all()
    with pytest.raises(ValueError, match="pleura"):
        hr_ldm.candidate_centres(lung, margin_vox=50.0)
    # existing nodules keep drawn centres at the margin's distance
    nodule = np.zeros_like(lung)
    nodule[22:27, 22:27, 12:17] = True
    away = hr_ldm.candidate_centres(lung, margin_vox=3.0, exclude=nodule, exclude_margin_vox=4.0)
    dist_nodule = ndimage.distance_transform_edt(~nodule)
    assert len(away) < len(idx) and (dist_nodule[tuple(away.T)] > 4.0).all()


def test_library_keeps_6_to_30_mm_and_never_falls_back(cfg, crops):
    library = hr_ldm.NoduleLibrary.from_crops(crops, cfg)
    assert len(library) == 3 and (library.diameters_mm >= 6).all()  # the 5 mm crops are left out
    rng = np.random.default_rng(0)
    for y in range(3):
        assert library.subtypes[library.draw_shape(rng, (6, 10), y)] == y
    with pytest.raises(ValueError, match=r"no part-solid nodule of 20-30 mm.*7\.0"):
        library.draw_shape(rng, (20, 30), 1)
    with pytest.raises(ValueError, match="no nodule of 6-30 mm"):
        hr_ldm.NoduleLibrary.from_crops(crops[:1], cfg)


def test_place_mask_centres_the_shape():
    shape = np.ones((3, 3, 5, 2), np.uint8)
    out = hr_ldm.place_mask(shape, 8)
    assert out.shape == (3, 8, 8, 8) and out.sum() == shape.sum()
    idx = np.argwhere(out[0])
    assert np.allclose(idx.mean(0), [3.5, 3.5, 3.5], atol=0.6)


def _alpha_bar(scheduler, t):
    return 1.0 if t < 0 else float(scheduler.alphas_cumprod[t].double())


def test_background_is_re_anchored_inside_the_loop(cfg, vae, runs):
    """Eq. 10 at every step, not only at the end: outside M the state x_{t-1} is q(z_bg, t-1)
    (``noise_background=True``: it moves with z_bg by exactly sqrt(ab), plus unit Gaussian noise) or z_bg
    itself (``False``). The two anchors differ at every intermediate step and agree on z_bg at the end.

    Two backgrounds that differ only outside M, one seed: the sampler alone never sees z_bg, so how the
    states differ outside is the anchor's doing.
    """
    model = hr_ldm.load(cfg, runs[0], vae=vae, device="cpu")
    g = torch.Generator().manual_seed(0)
    z_bg = torch.randn(2, 4, 4, 4, 4, generator=g)
    cond = torch.zeros(2, 3, 4, 4, 4)
    cond[:, 0, 1:3, 1:3, 1:3] = 1
    cond[:, 1, 1:2, 1:3, 1:3] = 1
    outside = cond[:, :1].expand_as(z_bg) == 0
    z_other = torch.where(outside, z_bg + torch.randn(z_bg.shape, generator=g), z_bg)
    hist = np.full(40, 1 / 40)
    inter = {}
    for noise_background in (True, False):
        (z, a), (_, b) = [hr_ldm.inpaint_latent(model, bg, cond, [0, 2], hist, noise_background=noise_background,
                                                intermediates_every=1) for bg in (z_bg, z_other)]
        assert torch.equal(z[outside], z_bg[outside])
        assert not torch.equal(z[~outside], z_bg[~outside])  # generated inside M
        assert len(a) == cfg.hr_ldm.ddim_steps and a[-1]["timestep"] == -1
        for it, it_other in zip(a[:-1], b[:-1]):
            t, x = it["timestep"], it["sample"]
            if noise_background:  # q(z_bg, t): sqrt(ab) z_bg + sqrt(1 - ab) eps, the same eps for both backgrounds
                ab = _alpha_bar(model.scheduler, t)
                assert torch.allclose((it_other["sample"] - x)[outside], ab**0.5 * (z_other - z_bg)[outside],
                                      atol=1e-5), t
                eps = (x - ab**0.5 * z_bg)[outside] / (1.0 - ab) ** 0.5
                assert abs(float(eps.mean())) < 0.2 and abs(float(eps.std()) - 1.0) < 0.2, t
            else:  # z_bg itself at every step
                assert torch.equal(x[outside], z_bg[outside]) and torch.equal(it_other["sample"][outside],
                                                                                z_other[outside]), t
        inter[noise_background] = a
    for noisy, clean in zip(inter[True][:-1], inter[False][:-1]):
        assert not torch.allclose(noisy["sample"][outside], clean["sample"][outside], atol=1e-2)
    assert torch.equal(inter[True][-1]["sample"][outside], inter[False][-1]["sample"][outside])
