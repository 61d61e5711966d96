"""lungsynth/eval/two_sample.py: the classifier two-sample test reads 0.5 on one distribution and 1.0 on two."""

import numpy as np
import pytest

from lungsynth.eval.two_sample import classifier_two_sample_test, wilson_interval


def _gauss(n, d=16, seed=0, shift=0.0):
    return np.random.default_rng(seed).normal(shift, 1.0, (n, d))


def test_one_distribution_is_indistinguishable():
    res = classifier_two_sample_test(_gauss(200, seed=0), _gauss(200, seed=1), seed=0)
    assert res.metric == "c2st" and res.n_real == res.n_fake == 200
    assert abs(res.value - 0.5) < 0.08
    assert res.ci_low < 0.5 < res.ci_high  # the interval covers chance
    assert res.extra["p_value"] > 0.05


def test_real_against_noise_is_told_apart():
    real = _gauss(120, seed=0)
    noise = np.random.default_rng(2).uniform(-4, 4, (120, 16))  # the shuffled/noise baseline's kind of set
    res = classifier_two_sample_test(real, noise, seed=0)
    shifted = classifier_two_sample_test(real, _gauss(120, seed=3, shift=1.5), seed=0)
    assert shifted.value > 0.97 and shifted.ci_low > 0.9 and shifted.extra["p_value"] < 1e-6
    assert res.value > 0.95 and res.ci_low > 0.9  # a change of spread alone is caught (0.57 without the squares)


def test_unequal_sets_are_balanced_so_chance_stays_half():
    """A majority guess on 300 real vs 30 synthetic would score 0.91; the test subsamples to 30 + 30."""
    res = classifier_two_sample_test(_gauss(300, seed=0), _gauss(30, seed=1), seed=0)
    assert res.n_real == res.n_fake == 30
    assert abs(res.value - 0.5) < 0.2


def test_too_few_samples_are_insufficient_not_computed():
    res = classifier_two_sample_test(_gauss(40), _gauss(6, seed=1))
    assert np.isnan(res.value) and res.extra["insufficient"] and res.ci_low is None
    with pytest.raises(ValueError, match="dimension"):
        classifier_two_sample_test(_gauss(40, d=16), _gauss(40, d=8))


def test_wilson_interval_by_hand():
    # 45 of 50 at 95%: p = 0.9, z = 1.95996; centre (0.9 + z^2/100) / (1 + z^2/50), half-width as Wilson
    z = 1.959963984540054
    centre = (0.9 + z * z / 100) / (1 + z * z / 50)
    half = z * np.sqrt(0.9 * 0.1 / 50 + z * z / 10000) / (1 + z * z / 50)
    assert wilson_interval(45, 50) == pytest.approx((centre - half, centre + half))
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0
