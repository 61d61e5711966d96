"""Image-level fidelity and diversity: MS-SSIM between samples, masked errors, HU histograms, nodule Dice.

Conventions: the first axis of every array is the sample axis. ``ms_ssim``/``ssim`` take
[B, C, H, W] or [B, C, X, Y, Z] (MONAI's layout); the masked metrics take any [B, ...] with a mask
that broadcasts against it (e.g. [B, 1, ...] for [B, C, ...]) and reduce over all but the first axis.
Inputs may be NumPy arrays or torch tensors; results are NumPy float64 arrays (one value per sample)
or Python floats.

MS-SSIM on small volumes: MONAI's ``compute_ms_ssim`` needs every side to survive ``L - 1`` halvings
with at least ``kernel_size`` voxels left (and applies its own check ``side // (L-1)^2 > k - 1``).
The default (11-voxel Gaussian window, 5 scales) needs sides >= 176. :func:`ms_ssim_settings`
therefore picks, explicitly and reported with every value, the largest number of scales that fits
with the requested kernel (weights: the first L of Wang et al.'s five, renormalised), and only when
even two scales do not fit a smaller odd kernel: 64^3 -> (11, 3 scales), 32^3 -> (11, 2),
16^3 -> (7, 2).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

MS_SSIM_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003
HU_RANGE: tuple[float, float] = (-1000.0, 400.0)


def _np(x: Any, dtype=np.float64) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _check_pair(pred: np.ndarray, target: np.ndarray, what: str) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"{what}: prediction {pred.shape} and reference {target.shape} differ in shape")
    if pred.ndim < 2:
        raise ValueError(f"{what}: expected [B, ...] with a sample axis first, got shape {pred.shape}")
    for name, a in (("prediction", pred), ("reference", target)):
        if not np.isfinite(a).all():
            raise ValueError(f"{what}: {name} contains NaN/inf")


def _mask_for(mask: Any, like: np.ndarray, what: str) -> np.ndarray:
    m = _np(mask)
    try:
        m = np.broadcast_to(m, like.shape)
    except ValueError:
        raise ValueError(f"{what}: mask of shape {m.shape} does not broadcast to {like.shape}") from None
    if not np.isfinite(m).all() or m.min() < 0 or m.max() > 1:
        raise ValueError(f"{what}: mask values must be in [0, 1]")
    return m


# --------------------------------------------------------------------------- SSIM family


def ms_ssim_settings(spatial_shape: Sequence[int], kernel_size: int = 11, max_scales: int = 5) -> dict[str, Any]:
    """The MS-SSIM window and scales that fit ``spatial_shape`` (see the module docstring).

    Returns ``{"kernel_size": k, "scales": L, "weights": (...)}``; ValueError when no 2-scale setting
    with a kernel >= 3 fits (sides < 6).
    """
    shape = [int(s) for s in spatial_shape]

    def fits(k: int, n_scales: int) -> bool:
        return all(s // 2 ** (n_scales - 1) >= k and s // max(1, n_scales - 1) ** 2 > k - 1 for s in shape)

    def pack(k: int, n_scales: int) -> dict[str, Any]:
        w = np.array(MS_SSIM_WEIGHTS[:n_scales])
        return {"kernel_size": k, "scales": n_scales, "weights": tuple(float(v) for v in w / w.sum())}

    max_scales = max(2, min(int(max_scales), len(MS_SSIM_WEIGHTS)))
    for n_scales in range(max_scales, 1, -1):
        if fits(kernel_size, n_scales):
            return pack(kernel_size, n_scales)
    for k in range(kernel_size - 2 if kernel_size % 2 else kernel_size - 1, 2, -2):
        if fits(k, 2):
            return pack(k, 2)
    raise ValueError(f"MS-SSIM needs every side >= 6 voxels, got spatial shape {tuple(shape)}; use ssim() instead")


def _torch_pair(a: Any, b: Any, what: str):
    import torch

    x = torch.as_tensor(_np(a, np.float32))
    y = torch.as_tensor(_np(b, np.float32))
    if x.shape != y.shape:
        raise ValueError(f"{what}: shapes {tuple(x.shape)} and {tuple(y.shape)} differ")
    if x.ndim not in (4, 5):
        raise ValueError(f"{what}: expected [B, C, H, W] or [B, C, X, Y, Z], got {tuple(x.shape)}")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError(f"{what}: input contains NaN/inf")
    return x, y


def _ssim_and_cs_separable(x, y, kernel_size: int, sigma: float, data_range: float, k1: float = 0.01,
                          k2: float = 0.03):
    """MONAI's ``compute_ssim_and_cs`` (Gaussian window) with the window applied one axis at a time.

    MONAI convolves with the full k^d kernel (k^3 = 1331 taps per voxel in 3D); the Gaussian window is
    the outer product of 1D windows, so d passes of k taps give the same maps up to float round-off
    (tests/eval/test_fidelity.py checks the agreement) at a fraction of the cost on 3D volumes.
    Returns per-voxel (ssim, cs) maps [B, C, *S'] (valid convolution).
    """
    import torch
    import torch.nn.functional as Fnn

    dims = x.ndim - 2
    dist = torch.arange(start=(1 - kernel_size) / 2, end=(1 + kernel_size) / 2, step=1)
    g = torch.exp(-torch.pow(dist / sigma, 2) / 2)
    g = (g / g.sum()).to(x)
    c = x.shape[1]
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    conv = getattr(Fnn, f"conv{dims}d")
    for axis in range(dims):
        shape = [1, 1] + [1] * dims
        shape[2 + axis] = kernel_size
        weight = g.view(shape).expand(5 * c, *shape[1:]).contiguous()
        stack = conv(stack, weight, groups=5 * c)
    mu_x, mu_y, mu_xx, mu_yy, mu_xy = stack.split(c, dim=1)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    sigma_x, sigma_y, sigma_xy = mu_xx - mu_x * mu_x, mu_yy - mu_y * mu_y, mu_xy - mu_x * mu_y
    cs = (2 * sigma_xy + c2) / (sigma_x + sigma_y + c2)
    ssim_map = ((2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)) * cs
    return ssim_map, cs


def ms_ssim(a: Any, b: Any, data_range: float = 1.0, kernel_size: int = 11,
            settings: dict[str, Any] | None = None, backend: str = "separable") -> np.ndarray:
    """MS-SSIM per pair of samples, [B] float64, with settings fitted to the size.

    Args:
        a, b: [B, C, H, W] or [B, C, X, Y, Z] in a known range (``data_range``; the course's [0, 1]).
        settings: from :func:`ms_ssim_settings` (computed from the shape when None).
        backend: ``separable`` (default; the MONAI algorithm with a separable window, much faster in
            3D) or ``monai`` (``monai.metrics.regression.compute_ms_ssim`` itself).
    """
    import torch
    import torch.nn.functional as Fnn

    x, y = _torch_pair(a, b, "ms_ssim")
    s = settings or ms_ssim_settings(x.shape[2:], kernel_size)
    dims = x.ndim - 2
    if backend == "monai":
        from monai.metrics.regression import compute_ms_ssim

        val = compute_ms_ssim(x, y, spatial_dims=dims, data_range=data_range, kernel_size=s["kernel_size"],
                              weights=s["weights"])
        return val.reshape(-1).double().numpy()
    if backend != "separable":
        raise ValueError(f"ms_ssim backend must be 'separable' or 'monai', got {backend!r}")
    pool = getattr(Fnn, f"avg_pool{dims}d")
    levels = []
    with torch.no_grad():
        for level in range(len(s["weights"])):
            ssim_map, cs = _ssim_and_cs_separable(x, y, s["kernel_size"], 1.5, data_range)
            last = level == len(s["weights"]) - 1
            levels.append(torch.relu((ssim_map if last else cs).reshape(x.shape[0], -1).mean(1)))
            if not last:
                x, y = pool(x, kernel_size=2), pool(y, kernel_size=2)
    w = torch.tensor(s["weights"], dtype=torch.float32).view(-1, 1)
    return torch.prod(torch.stack(levels) ** w, dim=0).double().numpy()


def ssim(pred: Any, target: Any, data_range: float = 1.0, kernel_size: int = 11,
         backend: str = "separable") -> np.ndarray:
    """SSIM per sample [B] (Gaussian window, sigma 1.5, as MONAI's ``SSIMMetric``); the window shrinks to
    the largest odd size that fits when a side is smaller than ``kernel_size``. ``backend="monai"``
    uses ``monai.metrics.regression.compute_ssim_and_cs`` itself."""
    x, y = _torch_pair(pred, target, "ssim")
    smallest = min(x.shape[2:])
    k = min(int(kernel_size), smallest if smallest % 2 else smallest - 1)
    if k < 3:
        raise ValueError(f"ssim: images of spatial shape {tuple(x.shape[2:])} are too small (need sides >= 3)")
    dims = x.ndim - 2
    if backend == "monai":
        from monai.metrics.regression import compute_ssim_and_cs

        val, _ = compute_ssim_and_cs(x, y, spatial_dims=dims, data_range=data_range, kernel_type="gaussian",
                                     kernel_size=(k,) * dims, kernel_sigma=(1.5,) * dims, k1=0.01, k2=0.03)
    elif backend == "separable":
        import torch

        with torch.no_grad():
            val, _ = _ssim_and_cs_separable(x, y, k, 1.5, data_range)
    else:
        raise ValueError(f"ssim backend must be 'separable' or 'monai', got {backend!r}")
    return val.reshape(val.shape[0], -1).mean(1).double().numpy()


def ms_ssim_diversity(samples: Any, *, data_range: float = 1.0, max_pairs: int | None = 200, seed: int = 0,
                      kernel_size: int = 11, batch_size: int = 8, backend: str = "separable") -> dict[str, Any]:
    """Mean MS-SSIM between distinct samples of one set: a diversity measure (lower = more diverse;
    compare with the same number on real data).

    Args:
        samples: [N, C, H, W] or [N, C, X, Y, Z], N >= 2.
        max_pairs: all N(N-1)/2 pairs when fewer, else a random subset of this many (seeded).
    Returns:
        ``{"mean", "std", "n_pairs", "kernel_size", "scales"}``.
    """
    import torch

    arr = _np(samples, np.float32)
    if arr.ndim not in (4, 5):
        raise ValueError(f"ms_ssim_diversity: expected [N, C, H, W] or [N, C, X, Y, Z], got {arr.shape}")
    n = arr.shape[0]
    if n < 2:
        raise ValueError(f"ms_ssim_diversity needs at least 2 samples, got {n}")
    if not np.isfinite(arr).all():
        raise ValueError("ms_ssim_diversity: samples contain NaN/inf")
    pairs = np.array([(i, j) for i in range(n) for j in range(i + 1, n)])
    if max_pairs is not None and len(pairs) > max_pairs:
        pairs = pairs[np.random.default_rng(seed).choice(len(pairs), int(max_pairs), replace=False)]
    settings = ms_ssim_settings(arr.shape[2:], kernel_size)
    t = torch.from_numpy(arr)
    vals = []
    for k in range(0, len(pairs), max(1, int(batch_size))):
        p = pairs[k:k + batch_size]
        vals.append(ms_ssim(t[p[:, 0]], t[p[:, 1]], data_range, settings=settings, backend=backend))
    v = np.concatenate(vals)
    return {"mean": float(v.mean()), "std": float(v.std()), "n_pairs": int(len(v)),
            "kernel_size": settings["kernel_size"], "scales": settings["scales"]}


# --------------------------------------------------------------------------- masked errors


def _masked_mean(err: np.ndarray, mask: Any | None, what: str) -> np.ndarray:
    axes = tuple(range(1, err.ndim))
    if mask is None:
        return err.mean(axis=axes)
    m = _mask_for(mask, err, what)
    total = m.sum(axis=axes)
    if (total == 0).any():
        raise ValueError(f"{what}: the mask is empty for sample(s) {np.flatnonzero(total == 0).tolist()}")
    return (err * m).sum(axis=axes) / total


def masked_mse(pred: Any, target: Any, mask: Any | None = None) -> np.ndarray:
    """Mean squared error per sample inside ``mask`` (Lung-DDPM: inside the lung), [B]."""
    p, t = _np(pred), _np(target)
    _check_pair(p, t, "masked_mse")
    return _masked_mean((p - t) ** 2, mask, "masked_mse")


def mae(pred: Any, target: Any, mask: Any | None = None) -> np.ndarray:
    """Mean absolute error per sample inside ``mask``, [B], in the inputs' unit."""
    p, t = _np(pred), _np(target)
    _check_pair(p, t, "mae")
    return _masked_mean(np.abs(p - t), mask, "mae")


def mae_hu(pred_hu: Any, target_hu: Any, mask: Any | None = None) -> np.ndarray:
    """Mean absolute error in HU per sample inside ``mask``, [B] (inputs already in HU)."""
    return mae(pred_hu, target_hu, mask)


def psnr(pred: Any, target: Any, data_range: float = 1.0, mask: Any | None = None) -> np.ndarray:
    """PSNR per sample in dB, ``10 log10(range^2 / MSE)`` (inside ``mask`` when given); inf when equal."""
    mse = masked_mse(pred, target, mask)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(float(data_range) ** 2 / mse)


# --------------------------------------------------------------------------- HU histograms


def hu_histogram(voxels_hu: Any, bins: int = 40, hu_range: tuple[float, float] = HU_RANGE,
                 mask: Any | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Normalised histogram (sums to 1) of HU values over ``bins`` equal bins on ``hu_range``.

    Values outside the range are clipped into the edge bins (air below -1000 counts as -1000).
    ``mask`` (same shape, > 0.5 = selected) picks the voxels. Returns (probabilities [bins], edges [bins+1]).
    """
    v = _np(voxels_hu)
    if mask is not None:
        m = _np(mask)
        if m.shape != v.shape:
            raise ValueError(f"hu_histogram: mask {m.shape} and voxels {v.shape} differ in shape")
        v = v[m > 0.5]
    v = v.reshape(-1)
    if v.size == 0:
        raise ValueError("hu_histogram: no voxels selected (empty mask or empty array)")
    if not np.isfinite(v).all():
        raise ValueError("hu_histogram: voxels contain NaN/inf")
    lo, hi = float(hu_range[0]), float(hu_range[1])
    counts, edges = np.histogram(np.clip(v, lo, hi), bins=int(bins), range=(lo, hi))
    return counts / counts.sum(), edges


def jensen_shannon(p: np.ndarray, q: np.ndarray, base: float = 2.0) -> float:
    """Jensen-Shannon divergence of two discrete distributions (normalised here); in [0, 1] for base 2."""
    p = np.asarray(p, np.float64)
    q = np.asarray(q, np.float64)
    if p.shape != q.shape or p.sum() <= 0 or q.sum() <= 0 or (p < 0).any() or (q < 0).any():
        raise ValueError("jensen_shannon: need two non-negative, non-empty histograms of the same length")
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        nz = a > 0
        return float((a[nz] * np.log(a[nz] / b[nz])).sum())

    return float(max(0.5 * kl(p, m) + 0.5 * kl(q, m), 0.0) / np.log(base))


def hu_histogram_jsd(voxels_a: Any, voxels_b: Any, bins: int = 40, hu_range: tuple[float, float] = HU_RANGE,
                     mask_a: Any | None = None, mask_b: Any | None = None) -> float:
    """JSD (bits, in [0, 1]) between the HU histograms of two voxel sets (e.g. generated and real nodules
    of one subtype), bins over ``hu_range`` as HR-LDM's 40-bin histogram."""
    pa, _ = hu_histogram(voxels_a, bins, hu_range, mask_a)
    pb, _ = hu_histogram(voxels_b, bins, hu_range, mask_b)
    return jensen_shannon(pa, pb)


# --------------------------------------------------------------------------- nodule Dice


def dice(a: Any, b: Any) -> float:
    """Dice of two binary masks (> 0.5); 1.0 when both are empty."""
    x, y = _np(a) > 0.5, _np(b) > 0.5
    if x.shape != y.shape:
        raise ValueError(f"dice: shapes {x.shape} and {y.shape} differ")
    total = x.sum() + y.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(x, y).sum() / total)


def generated_nodule(volume_hu: Any, mask: Any, threshold_hu: float = -500.0, margin: int | None = None) -> np.ndarray:
    """The nodule a generator drew where ``mask`` asked for one: voxels above ``threshold_hu`` inside the
    mask's bounding box grown by ``margin`` voxels (default: half the box's largest side, >= 2), kept
    only in connected components that touch the mask. One volume [X, Y, Z] (or [1, X, Y, Z]) -> bool."""
    from scipy import ndimage

    v = np.squeeze(_np(volume_hu))
    m = np.squeeze(_np(mask)) > 0.5
    if v.shape != m.shape:
        raise ValueError(f"generated_nodule: volume {v.shape} and mask {m.shape} differ in shape")
    if not np.isfinite(v).all():
        raise ValueError("generated_nodule: the volume contains NaN/inf")
    if not m.any():
        raise ValueError("generated_nodule: the condition mask is empty")
    idx = np.argwhere(m)
    lo, hi = idx.min(0), idx.max(0) + 1
    grow = max(2, int(np.ceil((hi - lo).max() / 2))) if margin is None else int(margin)
    lo, hi = np.maximum(lo - grow, 0), np.minimum(hi + grow, v.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    cand = np.zeros_like(m)
    cand[box] = v[box] > threshold_hu
    labels, _ = ndimage.label(cand)
    touching = np.unique(labels[m & cand])
    touching = touching[touching > 0]
    return np.isin(labels, touching) if touching.size else np.zeros_like(m)


def nodule_dice(volume_hu: Any, mask: Any, threshold_hu: float = -500.0, margin: int | None = None) -> np.ndarray:
    """Dice of the generated nodule (:func:`generated_nodule`) against the condition mask, per sample.

    Args:
        volume_hu: [B, X, Y, Z] or [B, 1, X, Y, Z] generated volumes in HU.
        mask: the nodule masks the generator was conditioned on, same shape.
        threshold_hu: the nodule/parenchyma threshold (solid ~ -500; ground-glass nodules need ~ -750).
    Returns:
        [B] float64; 0 where no nodule was drawn at the mask.
    """
    v, m = _np(volume_hu), _np(mask)
    if v.shape != m.shape:
        raise ValueError(f"nodule_dice: volumes {v.shape} and masks {m.shape} differ in shape")
    if v.ndim not in (4, 5):
        raise ValueError(f"nodule_dice: expected [B, X, Y, Z] or [B, 1, X, Y, Z], got {v.shape}")
    return np.array([dice(generated_nodule(v[i], m[i], threshold_hu, margin), np.squeeze(m[i]))
                     for i in range(v.shape[0])])
