"""bbox-LDM evaluate room: the tissue under a box, nodule crops and the 2D FID of Table 2."""

import numpy as np
import pytest
import torch
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


def _kid_by_hand(x, y):
    """The unbiased MMD^2 with the cubic polynomial kernel (u.v / d + 1)^3, self-pairs left out."""
    def k(u, v):
        return (u @ v / x.shape[1] + 1.0) ** 3

    def within(a):
        return sum(k(a[i], a[j]) for i in range(len(a)) for j in range(len(a)) if i != j) / (len(a) * (len(a) - 1))

    return within(x) + within(y) - 2 * sum(k(u, v) for u in x for v in y) / (len(x) * len(y))


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
    assert out["kid"] == pytest.approx(_kid_by_hand(fr, ff), rel=1e-4)
    assert B.fid_2d(real, real, net, clip)["fid"] == pytest.approx(0.0, abs=1e-6)  # identical sets


def _chest_slice(size: int = 64) -> np.ndarray:
    """[H, W] HU: air, an elliptic body at 40 HU holding two lungs at -850 HU."""
    yy, xx = np.mgrid[:size, :size]
    hu = np.where(((yy - 32) / 28) ** 2 + ((xx - 32) / 30) ** 2 <= 1, 40.0, -1000.0)
    for cx in (20, 44):
        hu[((yy - 32) / 18) ** 2 + ((xx - cx) / 8) ** 2 <= 1] = -850.0
    return hu.astype(np.float32)


def test_box_contrast_is_the_nodule_against_its_ring():
    hu = _chest_slice()
    flat = B.box_contrast(hu, (28, 18, 4))
    assert flat == pytest.approx(0.0)  # lung inside and around
    hu[28:32, 18:22] = 0.0  # a solid nodule filling the box
    assert B.box_contrast(hu, (28, 18, 4)) == pytest.approx(850.0)
    ring = B.ring((28, 18, 4), hu.shape)
    assert ring.sum() == 8 * 8 - 16 and not ring[28:32, 18:22].any()  # half the side (2 px, the minimum) around


def test_reference_contrast_reads_boxes_of_the_same_size():
    sides = np.array([3, 3, 3, 8, 8, 8, 8])
    contrasts = np.array([100.0, 120.0, 140.0, 500.0, 600.0, 700.0, 800.0])
    assert B.reference_contrast(3, sides, contrasts) == pytest.approx(120.0)
    assert B.reference_contrast(8, sides, contrasts) == pytest.approx(650.0)
    assert B.reference_contrast(4, sides, contrasts) == pytest.approx(120.0)  # widened by one pixel


def test_box_tissues_segment_the_slice_the_box_is_drawn_on():
    hu = _chest_slice()
    boxes = np.array([[28, 18, 4], [28, 30, 4], [2, 2, 4]])
    assert B.box_tissues(np.stack([hu] * 3), boxes, 2.0) == ["lung", "soft tissue", "outside body"]
    filled = hu.copy()
    filled[filled < -400] = 40.0
    filled[:2], filled[-2:], filled[:, :2], filled[:, -2:] = -1000.0, -1000.0, -1000.0, -1000.0
    # one box on two images: lung where the image has one, soft tissue where it has none
    assert B.box_tissues(np.stack([hu, filled]), boxes[[0, 0]], 2.0) == ["lung", "soft tissue"]
    assert B.box_tissues(np.stack([hu, filled]), boxes[[0, 0]], [2.0, 2.5]) == ["lung", "soft tissue"]  # per slice
    assert B.in_lung_rate(["lung", "lung border", "bone", "outside body"]) == pytest.approx(0.5)


class _Autoencoder(torch.nn.Module):
    """A stand-in frozen autoencoder on [N, 1, H, W] slices: the identity, or a 5 x 5 box blur (a decoder that
    smears small nodules into their surroundings)."""

    def __init__(self, blur: bool) -> None:
        super().__init__()
        self.blur = blur
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # encode/decode read the device from a parameter

    def encode_latent(self, x, sample=False):
        return x

    def decode_latent(self, z):
        return torch.nn.functional.avg_pool2d(z, 5, 1, 2, count_include_pad=False) if self.blur else z


def test_the_nodule_gate_ceiling_is_measured_through_the_autoencoder():
    """Gate 1 on real slices with their own boxes and on the autoencoder's reconstructions of them: an identity
    autoencoder keeps the real share, one that blurs 3-pixel nodules away loses it."""
    rng = np.random.default_rng(0)
    hu = np.stack([_chest_slice() for _ in range(6)])
    boxes = np.array([[28, 18, 3], [28, 42, 3], [26, 17, 3], [30, 44, 3], [27, 19, 3], [29, 41, 3]])
    for i, (y0, x0, s) in enumerate(boxes):
        hu[i, y0:y0 + s, x0:x0 + s] = rng.uniform(-100.0, 60.0)  # a solid nodule filling its box
    clip = (-1000.0, 2500.0)
    held = {"images": torch.from_numpy(((hu - clip[0]) / (clip[1] - clip[0]))[:, None]), "hu_clip": clip}
    real = {"hu": hu, "boxes": boxes, "sides": boxes[:, 2],
            "contrasts": np.asarray([B.box_contrast(hu[i], b) for i, b in enumerate(boxes)])}
    same = B.box_share_ceiling(held, real, _Autoencoder(blur=False))
    assert same["real"] == same["autoencoder"] and same["real"][0] == pytest.approx(1.0) and same["real"][1] == 6
    blurred = B.box_share_ceiling(held, real, _Autoencoder(blur=True))
    assert blurred["real"][0] == pytest.approx(1.0) and blurred["autoencoder"][0] < 0.5
