"""bbox-LDM evaluate room: the tissue under a box, nodule crops and the 2D FID of Table 2."""

import numpy as np
import pytest
from by_hand import frechet_by_hand

from lungsynth.methods import bbox_ldm as B


def test_tissue_classes_from_hu_and_lung():
    size = 64
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - 32) / 28) ** 2 + ((xx - 32) / 30) ** 2 <= 1
    hu = np.where(body, 40.0, -1000.0)
    lung = np.zeros((size, size), bool)
    lung[20:44, 12:28] = True
    hu[lung] = -850.0
    hu[50:56, 28:36] = 700.0  # a vertebra
    boxes = np.array([[24, 14, 6], [18, 10, 6], [50, 29, 5], [30, 40, 5], [0, 0, 4]])
    labels = B.classify_boxes(boxes, np.stack([hu] * 5), np.stack([lung] * 5))
    assert labels == ["lung", "lung border", "bone", "soft tissue", "outside body"]
    assert B.inside_lung_rate(labels) == pytest.approx(0.2)


def test_crops_and_fid_in_2d_features(tiny_setup):
    from lungsynth.eval.features import build_slice_net, slice_features

    _, data, _, _ = tiny_setup
    c = B.crops(data["images"], data["boxes"], size=16)
    assert c.shape == (len(data["images"]), 1, 16, 16)
    net, clip = build_slice_net(width=8, feature_dim=16), (-1000, 2500)
    real, fake = data["images"], data["images"].flip(-1)
    out = B.fid_2d(real, fake, net, clip)
    assert out["network"].startswith("slicenet2d")
    # the images are [0, 1] over the clip window, so the net sees them as they are: features and FID by hand
    fr, ff = (slice_features(x.numpy(), net, intensity="unit")[0] for x in (real, fake))
    want = frechet_by_hand(fr, ff)
    assert want > 1e-3 and out["fid"] == pytest.approx(want, rel=1e-4)
    assert B.fid_2d(real, real, net, clip)["fid"] == pytest.approx(0.0, abs=1e-6)  # identical sets
