"""HR-LDM's histograms: the hard HU histogram (condition and metric), the differentiable soft
histogram with a triangular kernel (the regulariser), Jensen-Shannon divergence, and the checks
every condition goes through.

Notation (paper, Sec. "Histogram regularisation"): K bins of width ``Delta`` and centres
``c_k = lo + (k + 1/2) Delta``; a value x contributes ``w_k(x) = max(0, 1 - |x - c_k| / Delta)`` to
bin k (a triangular kernel: linear interpolation between the two nearest centres, so the weights of
one value sum to 1); ``h_k = sum_i m_i w_k(x_i) / sum_i m_i`` with lesion weights ``m_i``.
``JSD(p, q) = 1/2 KL(p || r) + 1/2 KL(q || r)``, ``r = (p + q) / 2`` (natural log: 0 <= JSD <= ln 2).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

SUBTYPES: tuple[str, ...] = ("solid", "part-solid", "ground-glass")
HIST_BINS = 40
HIST_RANGE_HU: tuple[float, float] = (-1000.0, 400.0)


# --------------------------------------------------------------------------- validation


def validate_subtype(subtype: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Subtype id(s) as LongTensor [B]; anything outside {0 solid, 1 part-solid, 2 ground-glass} is an error."""
    t = torch.as_tensor(subtype)
    if t.is_floating_point() and not torch.equal(t, t.round()):
        raise ValueError(f"subtype must be an integer id 0 (solid), 1 (part-solid) or 2 (ground-glass), got {subtype!r}")
    t = t.long().reshape(-1)
    bad = [int(v) for v in t.tolist() if v not in (0, 1, 2)]
    if bad:
        raise ValueError(f"subtype {bad[0]} is not valid: use 0 (solid), 1 (part-solid) or 2 (ground-glass)")
    return t


def validate_histogram(hist: np.ndarray | torch.Tensor | Sequence[float], bins: int = HIST_BINS,
                       atol: float = 1e-3) -> torch.Tensor:
    """A target histogram as float32 [B, bins]: ``bins`` non-negative values per row summing to 1.

    Raises ValueError for the wrong number of bins, negative or non-finite entries, or rows that do
    not sum to 1 (within ``atol``); build one with :func:`hu_histogram`.
    """
    h = torch.as_tensor(np.asarray(hist, dtype=np.float32) if not torch.is_tensor(hist) else hist).float()
    if h.ndim == 1:
        h = h[None]
    if h.ndim != 2 or h.shape[1] != bins:
        raise ValueError(f"target histogram has shape {tuple(h.shape)}; expected {bins} bins over HU "
                         f"[{HIST_RANGE_HU[0]:.0f}, {HIST_RANGE_HU[1]:.0f}] (shape [{bins}] or [B, {bins}]); "
                         f"build one with hr_ldm.hu_histogram(hu, mask)")
    if not torch.isfinite(h).all() or (h < 0).any():
        raise ValueError("target histogram has negative or non-finite entries; it must be a probability vector")
    sums = h.sum(dim=1)
    if ((sums - 1.0).abs() > atol).any():
        raise ValueError(f"target histogram sums to {sums.tolist()} instead of 1; normalise it (h / h.sum())")
    return h


def validate_mask_in_lung(mask: np.ndarray | torch.Tensor, lung: np.ndarray | torch.Tensor,
                          min_inside: float = 1.0, what: str = "nodule mask") -> None:
    """Raise ValueError when less than ``min_inside`` of the (binary) ``mask`` lies inside ``lung``.

    Both are arrays of the same spatial shape (a leading channel axis of the mask is reduced with any).
    """
    m = np.asarray(torch.as_tensor(mask).cpu().numpy() if torch.is_tensor(mask) else mask) > 0
    lu = np.asarray(torch.as_tensor(lung).cpu().numpy() if torch.is_tensor(lung) else lung) > 0
    if m.ndim == lu.ndim + 1:
        m = m.any(axis=0)
    if m.shape != lu.shape:
        raise ValueError(f"{what} of shape {m.shape} does not match the lung mask {lu.shape}")
    n = int(m.sum())
    if n == 0:
        raise ValueError(f"{what} is empty; give at least one nodule voxel")
    inside = float((m & lu).sum()) / n
    if inside < min_inside - 1e-9:
        raise ValueError(f"{what} lies {100 * (1 - inside):.1f}% outside the lung; place the nodule inside the "
                         f"lung mask (e.g. a centre from hr_ldm.sample_centre) or pass include_rim=True for "
                         f"sub-pleural nodules")


# --------------------------------------------------------------------------- histograms


def hu_histogram(hu: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor | None = None,
                 bins: int = HIST_BINS, hu_range: tuple[float, float] = HIST_RANGE_HU) -> np.ndarray:
    """Normalised hard HU histogram of the voxels where ``mask`` > 0 (all voxels when None).

    Values outside ``hu_range`` are clipped into the edge bins. Returns float64 [bins] summing to 1
    (raises ValueError for an empty mask).
    """
    a = hu.detach().cpu().numpy() if torch.is_tensor(hu) else np.asarray(hu)
    if mask is not None:
        m = mask.detach().cpu().numpy() if torch.is_tensor(mask) else np.asarray(mask)
        a = a[np.broadcast_to(m > 0, a.shape)]
    a = np.clip(a.astype(np.float64).ravel(), hu_range[0], hu_range[1])
    if a.size == 0:
        raise ValueError("hu_histogram: the mask selects no voxel")
    h, _ = np.histogram(a, bins=bins, range=hu_range)
    return h / h.sum()


def bin_centres(bins: int = HIST_BINS, value_range: tuple[float, float] = HIST_RANGE_HU) -> np.ndarray:
    """Centres ``c_k`` of ``bins`` equal bins over ``value_range`` (for plots)."""
    lo, hi = value_range
    width = (hi - lo) / bins
    return lo + width * (np.arange(bins) + 0.5)


def soft_histogram(values: torch.Tensor, weights: torch.Tensor | None = None, bins: int = HIST_BINS,
                   value_range: tuple[float, float] = (0.0, 1.0), eps: float = 1e-8) -> torch.Tensor:
    """Differentiable histogram with a triangular kernel (module docstring).

    Args:
        values: [N] or [B, N]. Values are clamped to [c_0, c_{K-1}] so every one counts.
        weights: None or the same shape (lesion weights m_i >= 0, soft masks allowed).
        bins: K. value_range: (lo, hi).
    Returns:
        [K] or [B, K], each row summing to 1 (an all-zero weight row gives the uniform histogram).
    """
    squeeze = values.ndim == 1
    v = values[None] if squeeze else values
    w = torch.ones_like(v) if weights is None else (weights[None] if squeeze else weights).to(v.dtype)
    if w.shape != v.shape:
        raise ValueError(f"soft_histogram: weights {tuple(w.shape)} do not match values {tuple(v.shape)}")
    lo, hi = float(value_range[0]), float(value_range[1])
    width = (hi - lo) / bins
    centres = torch.linspace(lo + width / 2, hi - width / 2, bins, device=v.device, dtype=v.dtype)
    x = v.clamp(centres[0].item(), centres[-1].item())
    kernel = (1.0 - (x[..., None] - centres).abs() / width).clamp_min(0.0)  # [B, N, K]
    h = (kernel * w[..., None]).sum(dim=1) + eps
    h = h / h.sum(dim=1, keepdim=True)
    return h[0] if squeeze else h


def js_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Jensen-Shannon divergence (natural log) between histograms over the last axis: [..., K] -> [...].

    Both are renormalised after adding ``eps`` (so empty bins have finite gradients); 0 for equal
    histograms, at most ln 2.
    """
    if p.shape != q.shape:
        raise ValueError(f"js_divergence: shapes {tuple(p.shape)} and {tuple(q.shape)} differ")
    p = (p + eps) / (p + eps).sum(dim=-1, keepdim=True)
    q = (q + eps) / (q + eps).sum(dim=-1, keepdim=True)
    r = 0.5 * (p + q)
    kl_pr = (p * (p.log() - r.log())).sum(dim=-1)
    kl_qr = (q * (q.log() - r.log())).sum(dim=-1)
    return (0.5 * (kl_pr + kl_qr)).clamp_min(0.0)


def js_divergence_np(p: np.ndarray, q: np.ndarray) -> float:
    """:func:`js_divergence` for two NumPy histograms [K] (metrics)."""
    return float(js_divergence(torch.as_tensor(p, dtype=torch.float64), torch.as_tensor(q, dtype=torch.float64)))


def feature_histograms(feat_pred: torch.Tensor, feat_true: torch.Tensor, weights: torch.Tensor,
                       bins: int = HIST_BINS) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft histograms of decoder features inside the lesion, for the JSD regulariser.

    Decoder features have no fixed range, so both are mapped by ``sigmoid((f - mu) / sd)`` with the
    ground truth's lesion mean and std (detached) and binned on [0, 1]: the same map for both keeps
    the comparison fair and every value differentiable.

    Args:
        feat_pred, feat_true: [B, F, *S] features of the truncated decoder (prediction, ground truth).
        weights: [B, 1, *S] lesion weights at the feature grid (soft allowed).
    Returns:
        (h_pred, h_true), each [B, bins]; only lesion voxels enter (per-sample loop).
    """
    hp, ht = [], []
    for b in range(feat_pred.shape[0]):
        w = weights[b].expand_as(feat_true[b]).reshape(-1)
        keep = w > 0
        if not bool(keep.any()):
            keep = torch.ones_like(keep)
            w = torch.ones_like(w)
        ft = feat_true[b].reshape(-1)[keep].detach()
        fp = feat_pred[b].reshape(-1)[keep]
        wk = w[keep]
        mu = (ft * wk).sum() / wk.sum()
        sd = (((ft - mu) ** 2 * wk).sum() / wk.sum()).sqrt().clamp_min(1e-4)
        hp.append(soft_histogram(torch.sigmoid((fp - mu) / sd), wk, bins))
        ht.append(soft_histogram(torch.sigmoid((ft - mu) / sd), wk, bins))
    return torch.stack(hp), torch.stack(ht)
