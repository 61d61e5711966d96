"""lungsynth/eval/distribution.py: FID, KID, MMD and their failure modes."""

import warnings

import numpy as np
import pytest
from by_hand import frechet_by_hand, gaussian_mmd2_by_hand, mmd2_by_hand

from lungsynth.config import get_config
from lungsynth.eval.distribution import (MIN_INTERVAL_N, evaluate_distribution, fid, fid_value, frechet_distance,
                                         kid, mmd, sqrtm_real)


def _gauss(n, d=16, seed=0, shift=0.0, scale=1.0):
    return np.random.default_rng(seed).normal(shift, scale, (n, d))


def test_fid_self_is_zero_and_grows_with_noise():
    x = _gauss(60, 32)
    assert fid(x, x, min_samples_warn=10).value == pytest.approx(0.0, abs=1e-8)
    rng = np.random.default_rng(1)
    values = [fid(x, x + rng.normal(0, s, x.shape), min_samples_warn=10).value for s in (0.1, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(values, values[1:])) and values[0] > 0


def test_fid_methods_agree():
    # N > D: every route applies
    x, y = _gauss(300, 8, 0), _gauss(250, 8, 1, shift=0.3, scale=1.2)
    ref = fid_value(x, y, "sqrtm")
    for m in ("gram", "eig", "auto"):
        assert fid_value(x, y, m) == pytest.approx(ref, rel=1e-6)
    # N < D (singular covariances, the usual case with 2048-d features): gram and eig agree
    x, y = _gauss(20, 64, 2), _gauss(25, 64, 3, shift=0.2)
    assert fid_value(x, y, "gram") == pytest.approx(fid_value(x, y, "eig"), rel=1e-6)
    assert fid(x, y, min_samples_warn=2).extra["method"] == "gram"


def test_sqrtm_never_complex():
    # a negative eigenvalue: scipy's root is complex, ours keeps the real part
    a = np.array([[-1.0, 0.0], [0.0, 4.0]])
    r = sqrtm_real(a)
    assert r.dtype == np.float64 and not np.iscomplexobj(r)
    assert r[1, 1] == pytest.approx(2.0)
    # product of two rank-deficient covariances (N < D)
    x, y = _gauss(10, 64, 4), _gauss(10, 64, 5)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    r = sqrtm_real(s1 @ s2)
    assert not np.iscomplexobj(r) and np.isfinite(r).all()
    d = frechet_distance(x.mean(0), s1, y.mean(0), s2)
    assert isinstance(d, float) and d == pytest.approx(frechet_by_hand(x, y), rel=1e-6)  # exact for singular S
    assert isinstance(fid(x, y, min_samples_warn=2).value, float)


def test_frechet_distance_of_known_gaussians():
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    want = 1.0 + 0.0 + 6.25 + (1 - 3) ** 2 + (2 - 1) ** 2 + 0.0
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-9)
    # the same Gaussians rotated: the distance does not change (the covariances are no longer diagonal)
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    assert frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T) == pytest.approx(want,
                                                                                                          rel=1e-9)
    # 2 x 2, not commuting: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M = S1 S2 (eigenvalues > 0)
    s1, s2 = np.array([[2.0, 0.5], [0.5, 1.0]]), np.array([[1.0, -0.3], [-0.3, 3.0]])
    m = s1 @ s2
    tr_root = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    assert frechet_distance(np.zeros(2), s1, np.ones(2), s2) == pytest.approx(
        2.0 + np.trace(s1) + np.trace(s2) - 2 * tr_root, rel=1e-9)
    # identical Gaussians: 0; one-dimensional: (mu1 - mu2)^2 + (sigma1 - sigma2)^2
    assert frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(np.array([3.0]), np.array([[4.0]]), np.array([1.0]), np.array([[1.0]])) == \
        pytest.approx(4.0 + 1.0)


def test_kid_is_unbiased_and_detects_shift():
    same = [kid(_gauss(30, 16, 2 * i), _gauss(30, 16, 2 * i + 1), min_samples_warn=2).value for i in range(40)]
    mean, se = np.mean(same), np.std(same) / np.sqrt(len(same))
    assert abs(mean) < 3 * se + 1e-12  # unbiased: centred on 0 (either sign)
    assert min(same) < 0 < max(same)
    shifted = kid(_gauss(30, 16, 0), _gauss(30, 16, 1, shift=1.0), min_samples_warn=2).value
    assert shifted > 10 * abs(mean) and shifted > 0
    # FID, by contrast, is biased upward on equal distributions
    assert np.mean([fid(_gauss(30, 16, 2 * i), _gauss(30, 16, 2 * i + 1), min_samples_warn=2).value
                    for i in range(5)]) > 0.5


def test_kid_subsets():
    r = kid(_gauss(80, 8, 0), _gauss(90, 8, 1), subset_size=20, subsets=15, min_samples_warn=2)
    assert r.extra["subset_size"] == 20 and r.extra["subsets"] == 15 and r.extra["subset_std"] > 0


@pytest.mark.parametrize("kernel", ["gaussian", "polynomial"])
def test_mmd_by_hand(kernel):
    x = _gauss(25, 8, 0)
    assert mmd(x, x, kernel=kernel, min_samples_warn=2).value == pytest.approx(0.0, abs=1e-12)
    y = _gauss(25, 8, 1)
    r = mmd(x, y, kernel=kernel, bootstrap=30, min_samples_warn=2)
    if kernel == "gaussian":  # bandwidth: the median pairwise distance of the pooled set
        want = gaussian_mmd2_by_hand(x, y)
    else:  # KID's kernel: (u.v / D + 1)^3
        want = mmd2_by_hand(x, y, lambda u, v: (u @ v / 8 + 1.0) ** 3)
    assert r.value == pytest.approx(want, rel=1e-9)
    assert r.ci_low <= r.ci_high
    # a tiny case with numbers: x = {0, 1}, y = {3, 3} in 1-D, bandwidth 1: (2 + 2 e^-1/2) / 4 + 1 - (e^-4.5 + e^-2)
    want = (2 + 2 * np.exp(-0.5)) / 4 + 1 - (np.exp(-4.5) + np.exp(-2.0))
    small = mmd(np.array([[0.0], [1.0]]), np.array([[3.0], [3.0]]), bandwidth=1.0, min_samples_warn=2)
    assert small.value == pytest.approx(want, rel=1e-12)
    far = mmd(x, _gauss(25, 8, 1, shift=2.0), kernel=kernel, min_samples_warn=2)
    assert far.value > r.value


def test_interval_is_reproducible_and_brackets_value():
    x, y = _gauss(40, 8, 0), _gauss(40, 8, 1, shift=0.5)
    a = fid(x, y, bootstrap=50, seed=3, min_samples_warn=2, network="toy")
    b = fid(x, y, bootstrap=50, seed=3, min_samples_warn=2, network="toy")
    assert (a.ci_low, a.ci_high) == (b.ci_low, b.ci_high)
    assert a.ci_low < a.ci_high and a.network == "toy" and a.n_real == 40 and a.bootstrap == 50
    for fn in (kid, mmd):
        r = fn(x, y, bootstrap=50, min_samples_warn=2)
        assert r.ci_low <= r.value <= r.ci_high and r.ci_low < r.ci_high
    assert "fid = " in str(a) and a.as_dict()["metric"] == "fid"


def test_bad_input_errors_and_warning():
    x = _gauss(10, 8)
    for fn in (fid, kid, mmd):
        with pytest.raises(ValueError, match="dimension 8 but fake have 9"):
            fn(x, _gauss(10, 9), min_samples_warn=2)
        with pytest.raises(ValueError, match="at least 2"):
            fn(x, x[:1], min_samples_warn=2)
        bad = x.copy()
        bad[3, 2] = np.nan
        with pytest.raises(ValueError, match="NaN"):
            fn(x, bad, min_samples_warn=2)
        with pytest.raises(ValueError, match="matrix"):
            fn(x[:, 0], x[:, 1], min_samples_warn=2)
        with pytest.warns(UserWarning, match="< 50"):
            fn(x, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fid(_gauss(60, 4), _gauss(60, 4, 1))  # enough samples: no warning


def test_evaluate_distribution_uses_profile():
    cfg = get_config("smoke")
    with pytest.warns(UserWarning):
        out = evaluate_distribution(_gauss(20, 8), _gauss(20, 8, 1), cfg, network="toy")
    assert set(out) == {"fid", "kid", "mmd"}
    assert all(r.bootstrap == cfg.evaluation.bootstrap and r.ci_low is not None for r in out.values())


def test_fid_agrees_with_monai_where_monai_is_exact():
    """With more samples than dimensions S1 S2 is regular and MONAI's FIDMetric (scipy's sqrtm) computes the same
    quantity as ours; the board's N < D case is where ours stays exact (the Gram form, tested by hand above)."""
    import torch
    from monai.metrics import FIDMetric

    x, y = _gauss(300, 8, 0), _gauss(250, 8, 1, shift=0.3, scale=1.4)
    want = float(FIDMetric()(torch.from_numpy(y), torch.from_numpy(x)))
    assert fid(x, y, min_samples_warn=2).value == pytest.approx(want, rel=1e-6)
    assert frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)) == \
        pytest.approx(want, rel=1e-6)


def _mean_gaussian_kernel(mean: np.ndarray, var: float, bandwidth: float) -> float:
    """E exp(-|z|^2 / 2h^2) for z ~ N(mean, var I): the closed form behind a population Gaussian MMD^2."""
    total = bandwidth**2 + var
    return float((bandwidth**2 / total) ** (len(mean) / 2) * np.exp(-(mean @ mean) / (2 * total)))


def _population_values(d, shift, scale, bandwidth):
    """Population FID (closed form), Gaussian MMD^2 (closed form) and KID (a 4000-sample U-statistic)."""
    from lungsynth.eval.distribution import _mmd2_unbiased, polynomial_kernel

    mu = np.full(d, shift)
    zero = np.zeros(d)
    big_x, big_y = _gauss(4000, d, 99), _gauss(4000, d, 98, shift=shift, scale=scale)
    return {"fid": frechet_distance(zero, np.eye(d), mu, np.eye(d) * scale**2),
            "mmd": _mean_gaussian_kernel(zero, 2.0, bandwidth) + _mean_gaussian_kernel(zero, 2 * scale**2, bandwidth)
            - 2 * _mean_gaussian_kernel(mu, 1 + scale**2, bandwidth),
            "kid": _mmd2_unbiased(polynomial_kernel(big_x, big_x), polynomial_kernel(big_y, big_y),
                                  polynomial_kernel(big_x, big_y))}


@pytest.mark.parametrize("metric", ["fid", "mmd", "kid"])
def test_intervals_cover_the_population_value_and_contain_their_estimate(metric):
    # 100 simulated draws of 40 real / 48 synthetic 8-d Gaussians: a nominal 95% interval must contain the
    # population value at least 85 times and its own point estimate every time (a with-replacement bootstrap
    # of FID contained neither: duplicated rows inflate the statistic)
    d, shift, scale, bandwidth = 8, 0.3, 1.3, 4.0
    population = _population_values(d, shift, scale, bandwidth)[metric]
    fn = {"fid": fid, "kid": kid, "mmd": lambda x, y, **kw: mmd(x, y, bandwidth=bandwidth, **kw)}[metric]
    covered = contains = 0
    for draw in range(100):
        x, y = _gauss(40, d, 1000 + draw), _gauss(48, d, 2000 + draw, shift=shift, scale=scale)
        r = fn(x, y, bootstrap=100, seed=draw, min_samples_warn=2)
        covered += r.ci_low <= population <= r.ci_high
        contains += r.ci_low <= r.value <= r.ci_high
    assert contains == 100
    assert covered >= 85, f"{metric}: the 95% interval covered the population value {covered}/100 times"


def test_too_few_samples_give_insufficient_n_not_an_interval():
    # the 3D board's real test set has 2 scans: no interval, a note that says how many are needed
    x, y = _gauss(2, 8, 0), _gauss(30, 8, 1)
    for fn in (fid, kid, mmd):
        r = fn(x, y, bootstrap=50, min_samples_warn=2)
        assert r.ci_low is None and r.ci_high is None
        assert r.extra["interval"].startswith(f"insufficient N: an interval needs >= {MIN_INTERVAL_N}")
        assert "[insufficient N]" in str(r)
    assert fid(_gauss(8, 4, 0), _gauss(8, 4, 1), bootstrap=20, min_samples_warn=2).ci_low is not None


def test_kid_uses_all_samples_of_unequal_sets():
    from lungsynth.eval.distribution import polynomial_kernel

    x, y = _gauss(12, 8, 0), _gauss(30, 8, 1, shift=0.5)
    r = kid(x, y, min_samples_warn=2)
    assert r.extra["subsets"] == 1
    kxx, kyy = polynomial_kernel(x, x), polynomial_kernel(y, y)
    by_hand = ((kxx.sum() - np.trace(kxx)) / (12 * 11) + (kyy.sum() - np.trace(kyy)) / (30 * 29)
               - 2 * polynomial_kernel(x, y).mean())
    assert r.value == pytest.approx(by_hand, rel=1e-12)
    # a set larger than subset_size is subsampled; the smaller one is used whole
    big = kid(x, y, subset_size=20, subsets=5, min_samples_warn=2)
    assert big.extra["subsets"] == 5 and big.extra["subset_size"] == 20
