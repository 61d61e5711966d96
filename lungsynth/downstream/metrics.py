"""Metrics of the downstream chapters (10-11), and their aggregation over independent runs.

Segmentation, voxel-wise and per volume (P = predicted foreground, T = true foreground)::

    Dice = 2 |P and T| / (|P| + |T|)        (1 when both are empty)
    sensitivity = TP / (TP + FN)            (NaN when the volume has no foreground)
    specificity = TN / (TN + FP)            (NaN when the volume has no background)

Classification, one class against the rest: AUROC (``sklearn.metrics.roc_auc_score``) and AUPRC
(average precision, ``sklearn.metrics.average_precision_score``); NaN when the evaluation set holds no
positive or no negative of that class. Significance between two settings: the two-sided Mann-Whitney U
test (``scipy.stats.mannwhitneyu``) on the per-run values.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np

SIZE_BINS: tuple[tuple[float, float], ...] = ((6.0, 10.0), (10.0, 20.0), (20.0, 30.0))


def _binary(x: Any, what: str) -> np.ndarray:
    arr = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
    return arr > 0.5 if arr.dtype != bool else arr


def confusion(pred: Any, target: Any) -> dict[str, int]:
    """Voxel counts ``tp, fp, tn, fn`` of two binary volumes of the same shape (values > 0.5 are 1)."""
    p, t = _binary(pred, "pred"), _binary(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"prediction {p.shape} and target {t.shape} must have the same shape")
    tp = int(np.sum(p & t))
    fp = int(np.sum(p & ~t))
    fn = int(np.sum(~p & t))
    return {"tp": tp, "fp": fp, "tn": int(p.size) - tp - fp - fn, "fn": fn}


def dice(pred: Any, target: Any) -> float:
    """Dice of two binary volumes; 1.0 when both are empty."""
    c = confusion(pred, target)
    den = 2 * c["tp"] + c["fp"] + c["fn"]
    return 1.0 if den == 0 else 2.0 * c["tp"] / den


def sensitivity(pred: Any, target: Any) -> float:
    """TP / (TP + FN); NaN when the target has no foreground voxel."""
    c = confusion(pred, target)
    return float("nan") if c["tp"] + c["fn"] == 0 else c["tp"] / (c["tp"] + c["fn"])


def specificity(pred: Any, target: Any) -> float:
    """TN / (TN + FP); NaN when the target has no background voxel."""
    c = confusion(pred, target)
    return float("nan") if c["tn"] + c["fp"] == 0 else c["tn"] / (c["tn"] + c["fp"])


def segmentation_metrics(pred: Any, target: Any) -> dict[str, float]:
    """``{"dice", "sensitivity", "specificity"}`` of one volume (one confusion count, three ratios)."""
    c = confusion(pred, target)
    pos, neg, den = c["tp"] + c["fn"], c["tn"] + c["fp"], 2 * c["tp"] + c["fp"] + c["fn"]
    return {"dice": 1.0 if den == 0 else 2.0 * c["tp"] / den,
            "sensitivity": float("nan") if pos == 0 else c["tp"] / pos,
            "specificity": float("nan") if neg == 0 else c["tn"] / neg}


def one_vs_rest(y_true: Sequence[int], scores: Any, classes: Sequence[int] | None = None,
                names: Mapping[int, str] | None = None) -> list[dict[str, Any]]:
    """AUROC and AUPRC of each class against the rest.

    Args:
        y_true: [N] integer labels.
        scores: [N, K] class scores (probabilities or logits; only the order within a column matters),
            or [N] scores of class 1 for a binary task (K = 2).
        classes: which class indices to report (default ``range(K)``).
        names: class index -> name for the ``class`` column.
    Returns:
        one row per class: ``class_id, class, n_pos, n_neg, auroc, auprc, prevalence``; AUROC/AUPRC are NaN
        when the set has no positive or no negative of that class.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = np.asarray(y_true).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        s = np.stack([-s, s], axis=1)
    if s.ndim != 2 or s.shape[0] != y.shape[0]:
        raise ValueError(f"scores must be [N, K] with N = len(y_true) = {y.shape[0]}, got {s.shape}")
    rows = []
    for k in (range(s.shape[1]) if classes is None else classes):
        pos = y == k
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        ok = n_pos > 0 and n_neg > 0
        rows.append({"class_id": int(k), "class": (names or {}).get(int(k), str(k)), "n_pos": n_pos,
                     "n_neg": n_neg, "prevalence": n_pos / max(1, len(y)),
                     "auroc": float(roc_auc_score(pos, s[:, k])) if ok else float("nan"),
                     "auprc": float(average_precision_score(pos, s[:, k])) if ok else float("nan")})
    return rows


def pr_curve(y_true: Sequence[int], scores: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall arrays of class ``k`` against the rest (``sklearn.metrics.precision_recall_curve``)."""
    from sklearn.metrics import precision_recall_curve

    s = np.asarray(scores, dtype=np.float64)
    col = s if s.ndim == 1 else s[:, k]
    precision, recall, _ = precision_recall_curve(np.asarray(y_true).astype(int) == k, col)
    return precision, recall


def mann_whitney_p(a: Iterable[float], b: Iterable[float]) -> float:
    """Two-sided Mann-Whitney U p-value between two samples (NaNs dropped); NaN when a side is empty."""
    from scipy.stats import mannwhitneyu

    x = np.asarray([v for v in a if np.isfinite(v)], dtype=np.float64)
    y = np.asarray([v for v in b if np.isfinite(v)], dtype=np.float64)
    if len(x) == 0 or len(y) == 0:
        return float("nan")
    if np.all(x == x[0]) and np.all(y == x[0]):
        return 1.0  # identical constant samples: no evidence of a difference
    return float(mannwhitneyu(x, y, alternative="two-sided").pvalue)


def size_bin(diameter_mm: float, bins: Sequence[tuple[float, float]] = SIZE_BINS) -> str | None:
    """``"6-10"`` / ``"10-20"`` / ``"20-30"`` (half-open [lo, hi)); None outside every bin."""
    d = float(diameter_mm)
    for lo, hi in bins:
        if lo <= d < hi:
            return f"{lo:g}-{hi:g}"
    return None


def aggregate(rows: Any, by: Sequence[str], metrics: Sequence[str]) -> Any:
    """Mean, standard deviation (ddof 1; 0 for one run) and count of ``metrics`` over runs, per ``by`` group.

    Args:
        rows: a DataFrame or a list of dicts, one row per run (seed or fold) and group.
    Returns:
        a DataFrame with the ``by`` columns, then ``<metric>_mean``, ``<metric>_std``, ``<metric>_n``
        (runs with a finite value) for each metric, in the order the groups first appear.
    """
    import pandas as pd

    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    missing = [c for c in list(by) + list(metrics) if c not in df.columns]
    if missing:
        raise ValueError(f"aggregate: columns {missing} not in the rows (have {list(df.columns)})")
    out = []
    for key, g in df.groupby(list(by), sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key))
        for m in metrics:
            v = pd.to_numeric(g[m], errors="coerce").to_numpy(dtype=np.float64)
            v = v[np.isfinite(v)]
            row[f"{m}_mean"] = float(v.mean()) if len(v) else float("nan")
            row[f"{m}_std"] = float(v.std(ddof=1)) if len(v) > 1 else (0.0 if len(v) else float("nan"))
            row[f"{m}_n"] = int(len(v))
        out.append(row)
    return pd.DataFrame(out)


def mean_pm_std(table: Any, metrics: Sequence[str], digits: int = 3) -> Any:
    """The ``aggregate`` table with one ``"mean ± std"`` text column per metric (for notebooks)."""
    t = table.copy()
    for m in metrics:
        t[m] = [("n/a" if not np.isfinite(a) else f"{a:.{digits}f} ± {s:.{digits}f}")
                for a, s in zip(t[f"{m}_mean"], t[f"{m}_std"])]
    keep = [c for c in t.columns if not any(c.startswith(f"{m}_") for m in metrics)]
    return t[keep]
