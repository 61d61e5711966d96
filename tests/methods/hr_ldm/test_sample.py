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
