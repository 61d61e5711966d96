"""The classifier two-sample test: can a small classifier tell synthetic samples from real ones?

The automatic cousin of the papers' visual Turing tests (Lopez-Paz & Oquab 2017, "Revisiting classifier two-sample
tests"). Given real features [N1, D] and synthetic features [N2, D] (one row per sample, from
:mod:`lungsynth.eval.features`):

1. the larger set is subsampled to the smaller's size, so chance is exactly 0.5;
2. a logistic regression (scikit-learn, L2) on the standardised features and their squares (so a set with the
   right mean but the wrong spread is caught too: a linear classifier on the features alone scored 0.57 on
   Gaussian vs uniform features of equal mean, with the squares 0.996) is trained on ``folds - 1``
   stratified folds and predicts the held-out fold, so every sample is labelled once by a model that never saw it;
3. the held-out accuracy ``acc = (#correct) / (2 n)`` is the statistic: **0.5 means indistinguishable, 1.0 means
   every sample was told apart**. Its interval is Wilson's score interval for a binomial proportion over the 2n
   held-out predictions, and ``p`` the one-sided exact binomial test of ``acc > 0.5`` (the null of Lopez-Paz &
   Oquab, §3: under equal distributions each held-out prediction is a fair coin).

Below ``min_per_set`` samples in either set the test is reported as insufficient (value NaN,
``extra["insufficient"]``), never computed. The classifier and the interval come from scikit-learn and scipy;
only the fold loop and the report are written here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lungsynth.eval.distribution import MetricResult, check_features

MIN_PER_SET = 10  # below this a fold holds too few samples of a class to train and test on
DEFAULT_FOLDS = 5


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval of a binomial proportion ``successes / n`` (Wilson 1927)."""
    from scipy.stats import norm

    if n <= 0:
        raise ValueError("wilson_interval needs n >= 1 trials")
    z = float(norm.ppf(0.5 + level / 2.0))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def classifier_two_sample_test(real: Any, fake: Any, *, folds: int = DEFAULT_FOLDS, seed: int = 0,
                               level: float = 0.95, min_per_set: int = MIN_PER_SET,
                               network: str | None = None) -> MetricResult:
    """Held-out accuracy of a classifier telling ``fake`` [N2, D] from ``real`` [N1, D] (see the module docstring).

    Returns a :class:`MetricResult` named ``c2st``: ``value`` the accuracy (0.5 = indistinguishable), ``ci_low`` /
    ``ci_high`` its Wilson interval, ``n_real`` / ``n_fake`` the samples used (n each), ``extra`` the p-value of
    ``acc > 0.5``, the folds and, when a set is smaller than ``min_per_set``, ``insufficient=True`` with value NaN.
    """
    from scipy.stats import binomtest
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    r, f = check_features(real, fake, min_samples_warn=0, metric="c2st")
    n = min(len(r), len(f))
    if n < int(min_per_set):
        return MetricResult("c2st", float("nan"), n_real=len(r), n_fake=len(f), network=network,
                            extra={"insufficient": True, "needed_per_set": int(min_per_set)})
    rng = np.random.default_rng(seed)
    r = r[rng.choice(len(r), n, replace=False)]
    f = f[rng.choice(len(f), n, replace=False)]
    x = np.concatenate([r, f])
    y = np.concatenate([np.zeros(n, dtype=int), np.ones(n, dtype=int)])
    k = int(min(folds, n))
    correct = 0
    for train, test in StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(x, y):
        model = make_pipeline(StandardScaler(), FunctionTransformer(_with_squares), StandardScaler(),
                              LogisticRegression(max_iter=2000))
        model.fit(x[train], y[train])
        correct += int((model.predict(x[test]) == y[test]).sum())
    total = 2 * n
    low, high = wilson_interval(correct, total, level)
    p_value = float(binomtest(correct, total, 0.5, alternative="greater").pvalue)
    return MetricResult("c2st", correct / total, low, high, level, n_real=n, n_fake=n, network=network,
                        extra={"p_value": p_value, "folds": k,
                               "classifier": "logistic regression on standardised features and their squares"})


def _with_squares(x: np.ndarray) -> np.ndarray:
    """[N, D] -> [N, 2D]: the features and their squares (first and second moments per dimension)."""
    return np.concatenate([x, x * x], axis=1)
