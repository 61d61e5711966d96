"""bbox-LDM evaluate room: the tissue under a box, nodule crops and the 2D FID of Table 2."""

import numpy as np
import pytest

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
    from lungsynth.eval.features import build_slice_net

    _, data, _, _ = tiny_setup
    c = B.crops(data["images"], data["boxes"], size=16)
    assert c.shape == (len(data["images"]), 1, 16, 16)
    out = B.fid_2d(data["images"], data["images"].flip(-1), build_slice_net(width=8, feature_dim=16), (-1000, 2500))
    assert out["fid"] >= 0 and out["network"].startswith("slicenet2d")
