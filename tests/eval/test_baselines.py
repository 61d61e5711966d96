"""The distribution baselines: measured on the method's N against one reference half; floor below noise."""

import numpy as np
import pytest

from lungsynth.eval import baselines as B


def _images(n: int, seed: int = 0):
    """Smooth bodies: a disk of soft tissue with a smooth gradient inside, air outside."""
    rng = np.random.default_rng(seed)
    g = np.indices((24, 24)) - 11.5
    r = np.sqrt((g**2).sum(0))
    images, bodies = [], []
    for _ in range(n):
        body = r <= 9 + rng.uniform(-1, 1)
        img = np.where(body, 40 + 8 * g[0] * rng.uniform(0.5, 1.5) + rng.normal(0, 2, r.shape), -1000.0)
        images.append(img)
        bodies.append(body)
    return np.stack(images), np.stack(bodies)


def _features(images):
    """Two hand features: mean gradient magnitude inside tissue and the tissue mean (structure and level)."""
    gy, gx = np.gradient(images, axis=(1, 2))
    tissue = images > -500
    grad = np.where(tissue, np.hypot(gx, gy), 0).sum((1, 2)) / tissue.sum((1, 2))
    return np.stack([grad, np.where(tissue, images, 0).sum((1, 2)) / tissue.sum((1, 2))], 1)


def test_halves_are_disjoint_and_cover():
    a, r = B.halves(31, seed=3)
    assert len(a) == 16 and len(r) == 15 and not set(a) & set(r) and set(a) | set(r) == set(range(31))


def test_shuffle_keeps_the_histogram_inside_the_body_and_everything_outside():
    images, bodies = _images(3)
    out = B.shuffle_in_body(images, bodies, seed=1)
    for x, y, m in zip(images, out, bodies):
        assert np.array_equal(x[~m], y[~m]) and np.array_equal(np.sort(x[m]), np.sort(y[m]))
        assert not np.array_equal(x[m], y[m])


def test_baselines_use_the_method_n_and_the_floor_is_below_noise():
    images, bodies = _images(40)
    base = B.unit_baselines("slice", images, bodies, _features, n=12, reconstructions=images + 0.5, network="hand")
    assert base.floor.n_fake == base.noise.n_fake == base.ceiling.n_fake == 12  # the method's N
    assert base.floor.n_real == base.noise.n_real == len(base.reference) == 20  # one reference half
    assert base.floor.value < base.noise.value
    assert base.ceiling.value < base.noise.value
    # a method is scored on the same N against the same reference: a copy of real half A equals the floor
    a, _ = B.halves(40)
    assert base.score(_features(images[a])).value == pytest.approx(base.floor.value)
    with pytest.raises(ValueError, match="same N"):
        base.score(_features(images[:5]))
    with pytest.raises(ValueError, match="need at least 80"):
        B.unit_baselines("slice", images, bodies, _features, n=40)


def test_cached_baselines_are_reused_for_the_same_key_only(tmp_path):
    images, bodies = _images(20)
    calls = []

    def compute():
        calls.append(1)
        return B.unit_baselines("slice", images, bodies, _features, n=5)

    path = tmp_path / "baselines_slice.json"
    first = B.cached(path, {"data": "abc", "n": 5}, compute)
    again = B.cached(path, {"data": "abc", "n": 5}, compute)
    assert len(calls) == 1 and again.floor.value == pytest.approx(first.floor.value)
    np.testing.assert_allclose(again.reference, first.reference)
    B.cached(path, {"data": "other", "n": 5}, compute)  # re-cut data: recomputed
    path.write_text("{")  # half-written: recomputed
    B.cached(path, {"data": "other", "n": 5}, compute)
    assert len(calls) == 3
