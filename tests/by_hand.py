"""Reference values written out from their definitions, for tests that compare a reported metric with the
number it should be (imported by name: ``tests/conftest.py`` puts this folder on ``sys.path``)."""

from __future__ import annotations

import numpy as np


def frechet_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    """FID of two feature sets [N, D]: |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1^1/2 S2 S1^1/2).

    ``S1^1/2 S2 S1^1/2`` is symmetric PSD with the eigenvalues of ``S1 S2``, so the trace of the root is exact
    for singular covariances (N <= D) too.
    """
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    w, v = np.linalg.eigh(s1)
    s1h = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(s1h @ s2 @ s1h), 0.0, None)).sum()
    d = x.mean(0) - y.mean(0)
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def median_distance(x: np.ndarray, y: np.ndarray) -> float:
    """The median Euclidean distance over all pairs of the pooled set."""
    z = np.concatenate([x, y])
    return float(np.median([np.linalg.norm(z[i] - z[j]) for i in range(len(z)) for j in range(i + 1, len(z))]))


def mmd2_by_hand(x: np.ndarray, y: np.ndarray, k) -> float:
    """The biased (V-statistic) MMD^2 with kernel ``k(u, v)``, by explicit double sums."""
    def mean_k(a, b):
        return sum(k(u, v) for u in a for v in b) / (len(a) * len(b))
    return float(mean_k(x, x) + mean_k(y, y) - 2.0 * mean_k(x, y))


def gaussian_mmd2_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    """MMD^2 with the Gaussian kernel at the median-distance bandwidth."""
    bw = median_distance(x, y)
    return mmd2_by_hand(x, y, lambda u, v: np.exp(-np.sum((u - v) ** 2) / (2.0 * bw**2)))


def dice_by_hand(pred: np.ndarray, target: np.ndarray) -> float:
    """2 |P and T| / (|P| + |T|) of two boolean arrays; 1 when both are empty."""
    p, t = np.asarray(pred, bool), np.asarray(target, bool)
    den = p.sum() + t.sum()
    return 1.0 if den == 0 else float(2.0 * np.sum(p & t) / den)
