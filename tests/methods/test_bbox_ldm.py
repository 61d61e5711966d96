"""Chapter 04 (bbox-LDM): embedder, mask samplers, tissue classes, validation, train + sample per config.

Everything runs on small synthetic slices and an untrained VQ-VAE, so no prepared data is needed.
"""

import numpy as np
import pytest
import torch

from lungsynth.config import get_config
from lungsynth.methods import bbox_ldm as B

S = 32  # image side of the synthetic slices


def _lungs(n: int, size: int = S) -> np.ndarray:
    """Two elliptic lungs per slice, their size varying a little from slice to slice."""
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((n, size, size), bool)
    for i in range(n):
        ry, rx = size * (0.30 + 0.02 * (i % 3)), size * 0.16
        for cx in (size * 0.3, size * 0.7):
            out[i] |= ((yy - size / 2) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return out


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory):
    """A tiny config, synthetic training split and an untrained VQ-VAE."""
    from lungsynth.autoencoders import build_autoencoder

    cfg = get_config("smoke", {"data.size_2d": S, "bbox_ldm.unet_channels": "16,16,32", "bbox_ldm.batch_size": 4,
                               "bbox_ldm.train_steps": 2, "bbox_ldm.ddim_steps": 2,
                               "autoencoders.vqvae2d_channels": "8,8", "engine.checkpoint_every": 0})
    rng = np.random.default_rng(0)
    n = 6
    lungs = _lungs(n)
    boxes = np.stack([rng.integers(4, 20, n), rng.integers(4, 20, n), rng.integers(2, 8, n)], axis=1)
    hu = np.where(lungs, -850.0, 40.0)
    data = {"images": torch.from_numpy(((hu + 1000) / 3500)[:, None].astype(np.float32)), "boxes": boxes,
            "lungs": lungs, "attributes": rng.integers(1, 6, (n, 5)), "nodule_ids": list(map(str, range(n))),
            "hu_clip": (-1000.0, 2500.0)}
    torch.manual_seed(0)
    ae = build_autoencoder("vqvae2d", cfg).eval()
    return cfg, data, ae, tmp_path_factory.mktemp("bbox_runs")


# --------------------------------------------------------------------------- the attribute embedder


def test_attribute_embedder_is_the_papers():
    emb = B.AttributeEmbedder(dim=10, hidden=128, out_dim=10)
    assert len(emb.tables) == 5 == len(B.ATTRIBUTES)
    for table in emb.tables:
        assert isinstance(table, torch.nn.Embedding) and tuple(table.weight.shape) == (5, 10)
    linears = [m for m in emb.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(50, 128), (128, 128), (128, 10)]
    assert sum(isinstance(m, torch.nn.ReLU) for m in emb.mlp) == 2
    out = emb(torch.randint(1, 6, (7, 5)))
    assert out.shape == (7, 10)
    # each attribute has its own table: changing one score changes the embedding
    a = torch.tensor([[1, 2, 3, 4, 5]])
    b = a.clone()
    b[0, 4] = 1
    assert not torch.allclose(emb(a), emb(b))


def test_condition_encoder_tokens():
    m = torch.zeros(3, 1, 16, 16)
    m[:, :, 4:8, 4:8] = 1
    ctx2 = B.ConditionEncoder(2, grid=4)(m)
    ctx3 = B.ConditionEncoder(3, grid=4)(m, torch.randint(1, 6, (3, 5)))
    assert ctx2.shape == (3, 16, 10) and ctx3.shape == (3, 17, 10)
    with pytest.raises(ValueError, match="configuration 3 needs attributes"):
        B.ConditionEncoder(3)(m)


def test_masks_and_latent_grid():
    boxes = np.array([[0, 0, 4], [10, 20, 5]])
    masks = B.box_masks(boxes, S)
    assert masks.shape == (2, 1, S, S) and masks[1].sum() == 25
    np.testing.assert_array_equal(B.boxes_from_masks(masks).numpy(), boxes)
    lat = B.mask_to_latent(masks, 4)
    assert lat.shape == (2, 1, 8, 8) and lat[1].sum() >= 1  # max-pool keeps a small box


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("bad", [[0, 1, 1, 1, 1], [1, 1, 6, 1, 1], [1, 1, 1, 1, 2.5]])
def test_bad_attributes_are_errors(bad):
    with pytest.raises(ValueError, match="1..5|integer"):
        B.validate_attributes([bad])
    with pytest.raises(ValueError):
        B.AttributeEmbedder()(torch.tensor([bad]))


def test_attribute_shape_error():
    with pytest.raises(ValueError, match=r"\[B, 5\]"):
        B.validate_attributes([[1, 2, 3]])


@pytest.mark.parametrize("box", [[-1, 0, 4], [0, 30, 4], [29, 0, 4], [5, 5, 0]])
def test_boxes_outside_the_image_are_errors(box):
    with pytest.raises(ValueError, match="outside|side"):
        B.validate_boxes([box], S)


def test_config_must_be_one_two_or_three():
    assert B.check_config("2") == 2
    with pytest.raises(ValueError, match="configuration"):
        B.check_config(4)


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
    lungs = _lungs(5, 64)
    sides = np.array([2, 3, 5, 8, 12, 40])  # 40 never fits: it must be skipped, not placed
    attrs = np.array([[1, 2, 3, 4, 5]] * 6)
    draw = B.AnatomicalMaskSampler(lungs, sides, attrs).sample(400, rng=3)
    assert len(draw) == 400 and set(np.unique(draw.boxes[:, 2])) <= {2, 3, 5, 8, 12}
    for (y0, x0, s), k in zip(draw.boxes, draw.slice_index):
        assert lungs[k, y0:y0 + s, x0:x0 + s].all()
    np.testing.assert_array_equal(draw.attributes, np.tile([1, 2, 3, 4, 5], (400, 1)))


def test_anatomical_sampler_says_when_nothing_fits():
    with pytest.raises(ValueError, match="fits"):
        B.AnatomicalMaskSampler(_lungs(2, 64), [60], [[1, 1, 1, 1, 1]]).sample(1, rng=0, max_tries=5)


def test_table_sides_and_attributes_round_the_medians():
    import pandas as pd

    from lungsynth.methods.bbox_ldm.masks import table_sides_and_attributes

    df = pd.DataFrame({"diameter_mm": [7.0, 2.0, None], "sphericity": [3.5, 1, 2], "margin": [4, 5, 5],
                       "lobulation": [1, 1.4, 1], "spiculation": [2, 2, 2], "texture": [5, 4.5, 5]})
    sides, attrs = table_sides_and_attributes(df, spacing_mm=2.8, size=64)
    np.testing.assert_array_equal(sides, [3, 1])
    np.testing.assert_array_equal(attrs, [[4, 4, 1, 2, 5], [1, 5, 1, 2, 5]])


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


# --------------------------------------------------------------------------- train and sample


@pytest.mark.parametrize("config", [1, 2, 3])
def test_each_configuration_trains_and_samples(tiny_setup, config):
    cfg, data, ae, root = tiny_setup
    run = B.train(cfg, config, root / f"c{config}", data=data, ae=ae, progress=False)
    assert (run / "final.pt").is_file() and (run / "run.json").is_file()
    model = B.load(cfg, config, run, device="cpu", ae=ae)
    assert ("cond" in model.task.modules()) == (config > 1)
    out = model.sample(data["boxes"][:2], data["attributes"][:2], seed=0)
    assert out.shape == (2, 1, S, S) and torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    again = model.sample(data["boxes"][:2], data["attributes"][:2], seed=0)
    torch.testing.assert_close(out, again)  # seeded DDIM is reproducible
    with pytest.raises(ValueError, match="outside"):
        model.sample([[30, 30, 8]], [[1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="1..5"):
        model.sample([[3, 3, 4]], [[1, 1, 9, 1, 1]])


def test_load_refuses_another_configuration(tiny_setup):
    cfg, data, ae, root = tiny_setup
    run = B.train(cfg, 1, root / "refuse", data=data, ae=ae, progress=False)
    with pytest.raises(ValueError, match="config"):
        B.load(cfg, 3, run, device="cpu", ae=ae)


def test_crops_and_fid_in_2d_features(tiny_setup):
    from lungsynth.eval.features import build_slice_net

    _, data, _, _ = tiny_setup
    c = B.crops(data["images"], data["boxes"], size=16)
    assert c.shape == (len(data["images"]), 1, 16, 16)
    out = B.fid_2d(data["images"], data["images"].flip(-1), build_slice_net(width=8, feature_dim=16), (-1000, 2500))
    assert out["fid"] >= 0 and out["network"].startswith("slicenet2d")


def test_cli_parses_the_chapter_verbs():
    from lungsynth.cli import build_parser

    args = build_parser().parse_args(["bbox-ldm", "sample", "--config", "2", "--sampler", "anatomical",
                                      "--profile", "smoke"])
    assert (args.verb, args.config, args.sampler) == ("sample", 2, "anatomical")
