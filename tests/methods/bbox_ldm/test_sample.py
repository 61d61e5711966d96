"""bbox-LDM sample room: the paper's and the anatomical mask samplers, the nodule table, and load."""

import numpy as np
import pytest
import torch

from bbox_fakes import lung_masks
from lungsynth.methods import bbox_ldm as B

# --------------------------------------------------------------------------- mask samplers


def test_paper_sampler_reproduces_training_centres_and_sizes():
    rng = np.random.default_rng(1)
    size, n_train = 64, 300
    # two clusters of centres (left and right lung) and a skewed size distribution
    cy = np.clip(rng.normal(30, 5, n_train), 12, 50).round().astype(int)
    cx = np.where(rng.random(n_train) < 0.6, rng.normal(18, 3, n_train), rng.normal(46, 3, n_train))
    cx = np.clip(cx, 12, 50).round().astype(int)
    sides = rng.choice([3, 4, 5, 7, 11], size=n_train, p=[0.35, 0.3, 0.2, 0.1, 0.05])
    boxes = np.stack([cy - (sides - 1) // 2, cx - (sides - 1) // 2, sides], axis=1)
    sampler = B.PaperMaskSampler(boxes, size)
    draw = sampler.sample(20_000, rng=2)
    assert draw.boxes.shape == (20_000, 3) and draw.attributes.shape == (20_000, 5)
    B.validate_boxes(draw.boxes, size)
    # sizes: the empirical distribution (total variation distance small)
    vals = np.unique(sides)
    p_train = np.array([(sides == v).mean() for v in vals])
    p_draw = np.array([(draw.boxes[:, 2] == v).mean() for v in vals])
    assert 0.5 * np.abs(p_train - p_draw).sum() < 0.02
    # centres: the centre probability map (mean, spread and the two clusters' shares)
    c_train, c_draw = B.box_centres(boxes), B.box_centres(draw.boxes)
    np.testing.assert_allclose(c_draw.mean(0), c_train.mean(0), atol=0.6)
    np.testing.assert_allclose(c_draw.std(0), c_train.std(0), rtol=0.08)
    assert abs((c_draw[:, 1] < 32).mean() - (c_train[:, 1] < 32).mean()) < 0.02
    # attributes: uniform in 1..5, independently
    freq = np.array([(draw.attributes == v).mean() for v in range(1, 6)])
    np.testing.assert_allclose(freq, 0.2, atol=0.01)
    assert abs(np.corrcoef(draw.attributes[:, 0], draw.attributes[:, 4])[0, 1]) < 0.03


def test_anatomical_sampler_places_every_box_inside_the_lung():
    lungs = lung_masks(5, 64)
    sides = np.array([2, 3, 5, 8, 12, 40])  # 40 never fits: it must be skipped, not placed
    attrs = np.array([[1, 2, 3, 4, 5]] * 6)
    draw = B.AnatomicalMaskSampler(lungs, sides, attrs).sample(400, rng=3)
    assert len(draw) == 400 and set(np.unique(draw.boxes[:, 2])) <= {2, 3, 5, 8, 12}
    for (y0, x0, s), k in zip(draw.boxes, draw.slice_index):
        assert lungs[k, y0:y0 + s, x0:x0 + s].all()
    np.testing.assert_array_equal(draw.attributes, np.tile([1, 2, 3, 4, 5], (400, 1)))


def test_anatomical_sampler_says_when_nothing_fits():
    with pytest.raises(ValueError, match="fits"):
        B.AnatomicalMaskSampler(lung_masks(2, 64), [60], [[1, 1, 1, 1, 1]]).sample(1, rng=0, max_tries=5)


def test_table_sides_and_attributes_round_the_medians():
    import pandas as pd

    from lungsynth.methods.bbox_ldm import table_sides_and_attributes

    df = pd.DataFrame({"diameter_mm": [7.0, 2.0, None], "sphericity": [3.5, 1, 2], "margin": [4, 5, 5],
                       "lobulation": [1, 1.4, 1], "spiculation": [2, 2, 2], "texture": [5, 4.5, 5]})
    sides, attrs = table_sides_and_attributes(df, spacing_mm=2.8, size=64)
    np.testing.assert_array_equal(sides, [3, 1])
    np.testing.assert_array_equal(attrs, [[4, 4, 1, 2, 5], [1, 5, 1, 2, 5]])


# --------------------------------------------------------------------------- load


def test_load_refuses_another_configuration(tiny_setup):
    cfg, data, ae, root = tiny_setup
    run = B.train(cfg, 1, root / "refuse", data=data, ae=ae, progress=False)
    with pytest.raises(ValueError, match="config"):
        B.load(cfg, 3, run, device="cpu", ae=ae)


def test_a_sample_does_not_depend_on_its_batch_and_same_noise_repeats_it(tiny_setup, monkeypatch):
    import importlib

    cfg, data, ae, root = tiny_setup
    run = B.train(cfg, 3, root / "noise", data=data, ae=ae, progress=False)
    model = B.load(cfg, 3, run, device="cpu", ae=ae)
    # read the sampled latents themselves: the untrained VQ-VAE decodes them all to the same few codes
    monkeypatch.setattr(importlib.import_module("lungsynth.methods.bbox_ldm.sample"), "decode", lambda ae, z: z)
    boxes, attrs = data["boxes"][:4], data["attributes"][:4]
    together = model.sample(boxes, attrs, seed=5)
    in_pairs = model.sample(boxes, attrs, seed=5, batch_size=2)
    torch.testing.assert_close(together, in_pairs)  # sample i has its own noise stream
    assert not torch.allclose(together[0], together[1])
    one = np.repeat(boxes[:1], 3, axis=0), np.repeat(attrs[:1], 3, axis=0)
    same = model.sample(*one, seed=5, same_noise=True)
    torch.testing.assert_close(same[0], same[2])  # one condition, one noise: one slice
    torch.testing.assert_close(same[0], together[0])  # stream 0 is the first sample's
