"""Distribution distances between real and synthetic feature sets: FID, KID, MMD.

Every metric takes two feature matrices (real [N1, D], fake [N2, D], e.g. from
:mod:`lungsynth.eval.features`) and returns a :class:`MetricResult` with the value, a
confidence interval (:func:`half_sampling_interval`: half of each set's rows drawn without replacement, the
interval corrected for the bias that the estimate shares with its half-samples; "insufficient N" below
:data:`MIN_INTERVAL_N` rows per set), the sample counts and the feature network's name.

- FID (Heusel et al. 2017): ``|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr (S1 S2)^(1/2)``. :func:`fid`
  computes ``tr (S1 S2)^(1/2)`` exactly and always real: as the nuclear norm of the centred
  cross-Gram matrix ``A B^T / sqrt((n1-1)(n2-1))`` when there are fewer samples than dimensions
  (the usual case: the nonzero eigenvalues of ``S1 S2`` are the squared singular values of that
  matrix), else from the eigenvalues of ``S1^(1/2) S2 S1^(1/2)``. :func:`frechet_distance` is the
  classic moment form with ``scipy.linalg.sqrtm`` (eps on the diagonal when singular, the real part
  kept) for statistics given as (mu, Sigma). Both are biased upward for small N.
- KID (Binkowski et al. 2018): unbiased MMD^2 with the polynomial kernel
  ``k(x, y) = (x.y / D + 1)^3``, averaged over subsets; about 0 (either sign) for equal distributions.
- MMD (named ``mmd``; it is the squared distance): the biased (V-statistic) MMD^2 with a Gaussian
  (median-heuristic bandwidth) or polynomial
  kernel; always >= 0.

Why these are written here and not taken from MONAI (which the course uses first):

- MONAI's ``FIDMetric`` computes the same quantity, through ``scipy.linalg.sqrtm(S1 S2)``; with fewer samples than
  feature dimensions (every board row: 32 volumes against 2048 features) ``S1 S2`` is singular and that root is
  regularised or refused ("imaginary component too high"). :func:`fid` is exact there; where N > D the two agree
  (tested against ``monai.metrics.FIDMetric``).
- MONAI's ``MMDMetric`` is the unbiased *linear*-kernel MMD between two image batches of the same size; the board's
  MMD is a Gaussian-kernel MMD on feature sets of unequal size, a different quantity.
- MS-SSIM (:mod:`lungsynth.eval.fidelity`) is MONAI's algorithm, with MONAI's own ``compute_ms_ssim`` as a backend.

Bad input (different dimensions, fewer than 2 samples, NaN/inf) raises ValueError; fewer samples
than ``min_samples_warn`` (cfg.evaluation.min_samples_warn) issues a ``UserWarning``.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

DEFAULT_MIN_SAMPLES_WARN = 50


@dataclass
class MetricResult:
    """One distance with its uncertainty and provenance."""

    metric: str
    value: float
    ci_low: float | None = None
    ci_high: float | None = None
    ci_level: float = 0.95
    n_real: int = 0
    n_fake: int = 0
    bootstrap: int = 0
    network: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __float__(self) -> float:
        return float(self.value)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def interval(self, digits: int = 4) -> tuple[float, float] | str | None:
        """(low, high) rounded to ``digits``; the "insufficient N" note when the sets were too small; None
        when no interval was asked for."""
        if self.ci_low is not None and self.ci_high is not None:
            return (round(float(self.ci_low), digits), round(float(self.ci_high), digits))
        note = str(self.extra.get("interval", ""))
        return note if note.startswith("insufficient") else None

    def __str__(self) -> str:
        if self.ci_low is not None:
            ci = f" [{self.ci_low:.4g}, {self.ci_high:.4g}]"
        else:
            ci = " [insufficient N]" if str(self.extra.get("interval", "")).startswith("insufficient") else ""
        net = f" ({self.network})" if self.network else ""
        return f"{self.metric} = {self.value:.4g}{ci} n={self.n_real}/{self.n_fake}{net}"


# --------------------------------------------------------------------------- input checks


def check_features(real: Any, fake: Any, min_samples_warn: int | None = None,
                   metric: str = "metric") -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert two feature sets to float64 [N, D] arrays.

    Raises ValueError for non-2D input, different D, fewer than 2 rows, or NaN/inf values; warns when
    either set has fewer than ``min_samples_warn`` rows (None: the course default, 50).
    """
    arrays = []
    for name, x in (("real", real), ("fake", fake)):
        if hasattr(x, "detach"):
            x = x.detach().cpu().numpy()
        a = np.asarray(x, dtype=np.float64)
        if a.ndim == 1:
            raise ValueError(f"{metric}: {name} features have shape {a.shape}; expected a matrix [N, D] "
                             f"(one row per sample; use x[:, None] for scalar features)")
        if a.ndim != 2:
            raise ValueError(f"{metric}: {name} features have shape {a.shape}; expected [N, D]")
        if a.shape[0] < 2:
            raise ValueError(f"{metric}: {name} set has {a.shape[0]} sample(s); at least 2 are needed "
                             f"(and {min_samples_warn or DEFAULT_MIN_SAMPLES_WARN}+ for a stable estimate)")
        if not np.isfinite(a).all():
            raise ValueError(f"{metric}: {name} features contain {int((~np.isfinite(a)).sum())} NaN/inf values; "
                             f"check the generated volumes (a diverged sampler gives NaN)")
        arrays.append(a)
    r, f = arrays
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"{metric}: real features have dimension {r.shape[1]} but fake have {f.shape[1]}; "
                         f"extract both with the same feature network")
    limit = DEFAULT_MIN_SAMPLES_WARN if min_samples_warn is None else int(min_samples_warn)
    if min(r.shape[0], f.shape[0]) < limit:
        warnings.warn(f"{metric} from {r.shape[0]} real and {f.shape[0]} synthetic samples (< {limit}): the estimate "
                      f"is unstable{' and biased upward' if metric == 'fid' else ''}; read it with its confidence "
                      f"interval and compare only numbers computed with the same N", UserWarning, stacklevel=3)
    return r, f


MIN_INTERVAL_N = 8  # per set: half-samples of 4; below it a metric reports "insufficient N", not an interval


def half_sampling_interval(stat: Callable[[np.ndarray, np.ndarray], float], n_real: int, n_fake: int,
                           estimate: float, n_rep: int, level: float = 0.95, seed: int = 0,
                           floor: float | None = None) -> tuple[float | None, float | None, str]:
    """A bias-aware interval from half-samples drawn without replacement (delete-n/2 jackknife).

    ``stat(idx_real, idx_fake)`` is recomputed on ``n_rep`` pairs of half-samples (``n // 2`` distinct rows of
    each set). For a statistic whose bias and variance both scale as 1/N (biased MMD^2 exactly, FID once N
    exceeds the feature dimension, the unbiased KID for its variance) the half-sample's deviation from the full
    estimate has the same bias and spread as the full estimate's deviation from the population value, so the
    basic interval ``[estimate - q_hi, estimate - q_lo]`` (q: quantiles of the deviations) is corrected for the
    bias that a with-replacement bootstrap doubles (duplicated rows shrink covariances and inflate FID and
    MMD). The interval is widened to contain ``estimate`` and clipped at ``floor`` (0 for a distance).

    Returns (low, high, note): (None, None, "") when ``n_rep`` is 0; (None, None, "insufficient N ...") when a
    set has fewer than :data:`MIN_INTERVAL_N` rows. Coverage is measured by simulation in
    ``tests/eval/test_distribution.py``.
    """
    if n_rep <= 0:
        return None, None, ""
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    if min(n_real, n_fake) < MIN_INTERVAL_N:
        return None, None, (f"insufficient N: an interval needs >= {MIN_INTERVAL_N} samples per set, "
                            f"got {n_real} real / {n_fake} synthetic")
    rng = np.random.default_rng(seed)
    half_real, half_fake = n_real // 2, n_fake // 2
    deviations = np.empty(int(n_rep))
    for b in range(int(n_rep)):
        i = np.sort(rng.choice(n_real, half_real, replace=False))
        j = np.sort(rng.choice(n_fake, half_fake, replace=False))
        deviations[b] = stat(i, j) - estimate
    alpha = (1.0 - level) / 2.0
    q_lo, q_hi = np.quantile(deviations, [alpha, 1.0 - alpha])
    low, high = min(estimate - q_hi, estimate), max(estimate - q_lo, estimate)
    if floor is not None:
        low = max(low, floor)
    return float(low), float(high), "half-sampling basic interval"


# --------------------------------------------------------------------------- FID


def sqrtm_real(matrix: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Principal square root of a square matrix with ``scipy.linalg.sqrtm``, always real.

    When the result is not finite (singular input) ``eps`` is added to the diagonal and the root
    recomputed; a complex result (round-off on a PSD-product, or a truly negative eigenvalue) keeps
    its real part. Returns a float64 array of the input's shape.
    """
    from scipy import linalg

    a = np.asarray(matrix, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"sqrtm_real needs a square matrix, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("sqrtm_real: the matrix contains NaN/inf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's "singular matrix" notice; handled below
        root = linalg.sqrtm(a)
        if not np.isfinite(root).all():
            root = linalg.sqrtm(a + eps * np.eye(a.shape[0]))
    if not np.isfinite(root).all():
        raise ValueError("sqrtm_real: no finite square root even after regularisation")
    return np.real(root).astype(np.float64)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), via ``scipy.linalg.sqrtm``.

    ``tr sqrt(sigma1 sigma2)``: when the root is not finite, or its imaginary part is not negligible,
    ``eps`` is added to both diagonals (as pytorch-fid does); the real part is used. Returns a float >= 0.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"frechet_distance: shapes do not match: mu {mu1.shape} / {mu2.shape}, "
                         f"sigma {s1.shape} / {s2.shape}")
    for name, a in (("mu1", mu1), ("mu2", mu2), ("sigma1", s1), ("sigma2", s2)):
        if not np.isfinite(a).all():
            raise ValueError(f"frechet_distance: {name} contains NaN/inf")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(s1 @ s2)
        imag_big = np.iscomplexobj(covmean) and np.abs(np.imag(covmean)).max() > 1e-3 * max(
            1.0, np.abs(np.real(covmean)).max())
        if not np.isfinite(covmean).all() or imag_big:
            offset = eps * np.eye(s1.shape[0])
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    tr_covmean = float(np.real(np.trace(covmean)))
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(value, 0.0)


def _fid_from_grams(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    """FID from linear Gram matrices of (pooled-mean-centred) features; exact and real.

    With A, B the rows centred on their own means, ``A B^T = C1 Kxy C2`` (C = centring matrix),
    ``tr S1 = tr(C1 Kxx C1) / (n1-1)`` and ``|mu1 - mu2|^2 = mean Kxx + mean Kyy - 2 mean Kxy``.
    """
    n1, n2 = kxx.shape[0], kyy.shape[0]
    mean_term = kxx.mean() + kyy.mean() - 2.0 * kxy.mean()
    tr1 = (np.trace(kxx) - kxx.sum() / n1) / (n1 - 1)
    tr2 = (np.trace(kyy) - kyy.sum() / n2) / (n2 - 1)
    cross = kxy - kxy.mean(axis=0, keepdims=True) - kxy.mean(axis=1, keepdims=True) + kxy.mean()
    nuclear = np.linalg.svd(cross, compute_uv=False).sum()
    value = mean_term + tr1 + tr2 - 2.0 * nuclear / np.sqrt((n1 - 1) * (n2 - 1))
    return float(max(value, 0.0))


def _fid_from_moments_eig(x: np.ndarray, y: np.ndarray) -> float:
    """FID with ``tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2))`` (symmetric PSD, real); for N > D."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    w, v = np.linalg.eigh(s1)
    s1h = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    ev = np.linalg.eigvalsh(s1h @ s2 @ s1h)
    tr_covmean = np.sqrt(np.clip(ev, 0.0, None)).sum()
    d = mu1 - mu2
    return float(max(d @ d + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean, 0.0))


def fid_value(real: np.ndarray, fake: np.ndarray, method: str = "auto") -> float:
    """FID of two validated float64 feature matrices (no warnings, no bootstrap).

    ``method``: ``auto`` (Gram/nuclear-norm when min(N) <= D, eigen form otherwise), ``gram``,
    ``eig``, or ``sqrtm`` (the moment form through :func:`frechet_distance`, as pytorch-fid).
    """
    if method == "sqrtm":
        return frechet_distance(real.mean(0), np.cov(real, rowvar=False), fake.mean(0), np.cov(fake, rowvar=False))
    if method == "eig" or (method == "auto" and min(len(real), len(fake)) > real.shape[1]):
        return _fid_from_moments_eig(real, fake)
    if method not in ("auto", "gram"):
        raise ValueError(f"unknown FID method {method!r}; use auto, gram, eig or sqrtm")
    centre = np.concatenate([real, fake]).mean(0)
    x, y = real - centre, fake - centre
    return _fid_from_grams(x @ x.T, y @ y.T, x @ y.T)


def fid(real: Any, fake: Any, *, bootstrap: int = 0, ci: float = 0.95, seed: int = 0,
        min_samples_warn: int | None = None, network: str | None = None, method: str = "auto") -> MetricResult:
    """Frechet distance between feature sets real [N1, D] and fake [N2, D], with a half-sampling interval.

    Args:
        bootstrap: number of half-sample replicates (cfg.evaluation.bootstrap; 0 = no interval).
        ci: interval level. seed: half-sampling RNG seed. network: the feature network's name (recorded).
        method: see :func:`fid_value`.
    """
    x, y = check_features(real, fake, min_samples_warn, "fid")
    value = fid_value(x, y, method)
    use_gram = method in ("auto", "gram") and (method == "gram" or min(len(x), len(y)) <= x.shape[1])
    if use_gram:
        centre = np.concatenate([x, y]).mean(0)
        xc, yc = x - centre, y - centre
        kxx, kyy, kxy = xc @ xc.T, yc @ yc.T, xc @ yc.T

        def stat(i: np.ndarray, j: np.ndarray) -> float:
            return _fid_from_grams(kxx[np.ix_(i, i)], kyy[np.ix_(j, j)], kxy[np.ix_(i, j)])
    else:
        def stat(i: np.ndarray, j: np.ndarray) -> float:
            return fid_value(x[i], y[j], "eig" if method == "auto" else method)
    low, high, note = half_sampling_interval(stat, len(x), len(y), value, bootstrap, ci, seed, floor=0.0)
    extra = {"method": "gram" if use_gram else method if method != "auto" else "eig", "dim": int(x.shape[1]),
             "interval": note}
    if min(len(x), len(y)) <= x.shape[1]:
        extra["bias"] = (f"N <= D ({min(len(x), len(y))} <= {x.shape[1]}): the bias no longer falls as 1/N, so the "
                         f"population FID can lie below the interval; compare FIDs computed with the same N")
    return MetricResult("fid", value, low, high, ci, len(x), len(y), int(bootstrap), network, extra)


# --------------------------------------------------------------------------- kernels, KID, MMD


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None,
                      coef0: float = 1.0) -> np.ndarray:
    """``(gamma x.y + coef0)^degree`` [N1, N2]; gamma defaults to 1/D (KID's kernel)."""
    g = 1.0 / x.shape[1] if gamma is None else float(gamma)
    return (g * (x @ y.T) + coef0) ** degree


def _sq_dists(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)
    return np.clip(d, 0.0, None)


def median_bandwidth(x: np.ndarray, y: np.ndarray) -> float:
    """Median heuristic: the median pairwise Euclidean distance in the pooled set (> 0)."""
    z = np.concatenate([x, y])
    d = _sq_dists(z, z)[np.triu_indices(len(z), k=1)]
    med = float(np.sqrt(np.median(d))) if d.size else 1.0
    return med if med > 0 else 1.0


def gaussian_kernel(x: np.ndarray, y: np.ndarray, bandwidth: float) -> np.ndarray:
    """``exp(-|x - y|^2 / (2 bandwidth^2))`` [N1, N2]."""
    return np.exp(-_sq_dists(x, y) / (2.0 * bandwidth**2))


def _mmd2_unbiased(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    """Unbiased MMD^2 (U-statistic) of sets of any sizes >= 2: within-set means leave out the diagonal."""
    def within(k: np.ndarray) -> float:
        n = k.shape[0]
        return float((k.sum() - np.trace(k)) / (n * (n - 1)))
    return within(kxx) + within(kyy) - 2.0 * float(kxy.mean())


def kid(real: Any, fake: Any, *, subsets: int = 100, subset_size: int = 1000, degree: int = 3,
        gamma: float | None = None, coef0: float = 1.0, bootstrap: int = 0, ci: float = 0.95, seed: int = 0,
        min_samples_warn: int | None = None, network: str | None = None) -> MetricResult:
    """Kernel Inception Distance: unbiased MMD^2 with the polynomial kernel.

    When both sets have at most ``subset_size`` samples (their sizes may differ) the value is the U-statistic on
    all of them; otherwise a set larger than ``subset_size`` is subsampled to it and the value is the mean over
    ``subsets`` draws (``extra["subset_std"]``). It is unbiased, so it can be slightly negative for equal
    distributions. The interval is :func:`half_sampling_interval` (half-samples have distinct rows only).
    """
    x, y = check_features(real, fake, min_samples_warn, "kid")
    kxx = polynomial_kernel(x, x, degree, gamma, coef0)
    kyy = polynomial_kernel(y, y, degree, gamma, coef0)
    kxy = polynomial_kernel(x, y, degree, gamma, coef0)
    mx, my = min(int(subset_size), len(x)), min(int(subset_size), len(y))
    rng = np.random.default_rng(seed)
    if mx == len(x) and my == len(y):
        values = np.array([_mmd2_unbiased(kxx, kyy, kxy)])
    else:
        vals = []
        for _ in range(max(1, int(subsets))):
            i = rng.choice(len(x), mx, replace=False)
            j = rng.choice(len(y), my, replace=False)
            vals.append(_mmd2_unbiased(kxx[np.ix_(i, i)], kyy[np.ix_(j, j)], kxy[np.ix_(i, j)]))
        values = np.array(vals)

    def stat(i: np.ndarray, j: np.ndarray) -> float:
        return _mmd2_unbiased(kxx[np.ix_(i, i)], kyy[np.ix_(j, j)], kxy[np.ix_(i, j)])

    value = float(values.mean())
    low, high, note = half_sampling_interval(stat, len(x), len(y), value, bootstrap, ci, seed + 1)
    return MetricResult("kid", value, low, high, ci, len(x), len(y), int(bootstrap), network,
                        {"subset_size": max(mx, my), "subsets": len(values), "subset_std": float(values.std()),
                         "interval": note, "statistic": "unbiased MMD^2, polynomial kernel",
                         "kernel": f"poly(d={degree}, gamma={'1/D' if gamma is None else gamma}, c={coef0})"})


def mmd(real: Any, fake: Any, *, kernel: str = "gaussian", bandwidth: float | None = None, degree: int = 3,
        gamma: float | None = None, coef0: float = 1.0, bootstrap: int = 0, ci: float = 0.95, seed: int = 0,
        min_samples_warn: int | None = None, network: str | None = None) -> MetricResult:
    """Maximum mean discrepancy, the biased (V-statistic) MMD^2 — never negative; biased upward by O(1/N).

    Args:
        kernel: ``gaussian`` (bandwidth: median heuristic on the pooled data when None, fixed for all
            half-samples) or ``polynomial`` (degree, gamma = 1/D by default, coef0).
    """
    x, y = check_features(real, fake, min_samples_warn, "mmd")
    if kernel == "gaussian":
        bw = median_bandwidth(x, y) if bandwidth is None else float(bandwidth)
        if bw <= 0:
            raise ValueError(f"mmd: bandwidth must be > 0, got {bw}")
        k = lambda a, b: gaussian_kernel(a, b, bw)  # noqa: E731
        desc = f"gaussian(bandwidth={bw:.4g})"
    elif kernel == "polynomial":
        k = lambda a, b: polynomial_kernel(a, b, degree, gamma, coef0)  # noqa: E731
        desc = f"poly(d={degree}, gamma={'1/D' if gamma is None else gamma}, c={coef0})"
    else:
        raise ValueError(f"mmd: unknown kernel {kernel!r}; use gaussian or polynomial")
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)

    def v_stat(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> float:
        return float(max(a.mean() + b.mean() - 2.0 * c.mean(), 0.0))

    value = v_stat(kxx, kyy, kxy)

    def stat(i: np.ndarray, j: np.ndarray) -> float:
        return v_stat(kxx[np.ix_(i, i)], kyy[np.ix_(j, j)], kxy[np.ix_(i, j)])

    low, high, note = half_sampling_interval(stat, len(x), len(y), value, bootstrap, ci, seed + 2, floor=0.0)
    return MetricResult("mmd", value, low, high, ci, len(x), len(y), int(bootstrap), network,
                        {"kernel": desc, "statistic": "biased MMD^2 (V-statistic)", "interval": note})


# --------------------------------------------------------------------------- all at once


def evaluate_distribution(real: Any, fake: Any, cfg: Any = None, *, network: str | None = None,
                          metrics: Sequence[str] = ("fid", "kid", "mmd"), seed: int = 0) -> dict[str, MetricResult]:
    """FID, KID and MMD with the profile's bootstrap count and sample warning (``cfg.evaluation``)."""
    ev = getattr(cfg, "evaluation", None)
    n_boot = int(getattr(ev, "bootstrap", 0) or 0)
    warn_n = getattr(ev, "min_samples_warn", None)
    fns = {"fid": fid, "kid": kid, "mmd": mmd}
    out = {}
    for name in metrics:
        if name not in fns:
            raise ValueError(f"unknown metric {name!r}; use {', '.join(fns)}")
        out[name] = fns[name](real, fake, bootstrap=n_boot, seed=seed, min_samples_warn=warn_n, network=network)
    return out
