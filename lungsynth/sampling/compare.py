"""Samplers and step counts on one trained method (chapter 08): quality against time.

:func:`compare_samplers` generates the same held-out conditions with each (sampler, steps) setting of
an adapter that takes ``sampler`` / ``steps`` options (LAND: DDPM and DDIM from one checkpoint), and
reports seconds per sample, MMD of the samples' features to the real test set, MS-SSIM diversity,
and the MSE inside the lung against the condition's real scan (a proxy: LAND is not an inpainting
method, so this measures how close the anatomy is, not a reconstruction error).
"""

from __future__ import annotations

import copy
import time
import warnings
from typing import Any, Sequence

import numpy as np


def compare_samplers(cfg: Any, method: str, settings: Sequence[tuple[str, int]], *, n: int = 2, seed: int = 0,
                     model: Any = None) -> dict[str, Any]:
    """Rows ``{"sampler", "steps", "s_per_sample", "mmd", "ms_ssim", "lung_mse"}`` and the images.

    Args:
        method: a registered volume method whose adapter reads ``sampler`` and ``steps`` options.
        settings: e.g. ``[("ddpm", 20), ("ddim", 20), ("ddim", 5)]``.
        n: held-out conditions (>= 2: MMD and diversity need two samples).
        model: an already loaded model (else the trained default run is loaded).
    Returns:
        ``{"rows": [...], "images": {label: [n, D, H, W] HU}, "real": [n, D, H, W] HU, "network": name}``.
    """
    from lungsynth.eval.distribution import mmd
    from lungsynth.eval.fidelity import masked_mse, ms_ssim_diversity
    from lungsynth.eval.features import hu_to_unit_range, unit_features
    from lungsynth.sampling.registry import get_method

    base = get_method(method)
    if base.unit != "volume":
        raise ValueError(f"compare_samplers takes a volume method, {method!r} generates {base.unit}s")
    if n < 2:
        raise ValueError(f"n must be >= 2 (MMD and MS-SSIM need two samples), got {n}")
    conds = base.conditions(cfg, "heldout", n, seed)
    model = model if model is not None else base.load(cfg, base.ensure_trained(cfg))
    real = np.stack([c.arrays["ct"] for c in conds]).astype(np.float32)
    lung = np.stack([c.arrays["lung"] > 0 for c in conds]).astype(np.float32)
    f_real, name = unit_features(cfg, "volume", real)
    rows, images = [], {}
    for sampler, steps in settings:
        adapter = copy.copy(base)
        adapter.options = {**base.options, "sampler": sampler, "steps": int(steps)}
        t0 = time.perf_counter()
        samples = adapter.generate(cfg, model, conds, seed)
        secs = (time.perf_counter() - t0) / len(conds)
        x = np.stack([s["arrays"]["ct"] for s in samples]).astype(np.float32)
        f, _ = unit_features(cfg, "volume", x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            m = mmd(f_real, f, network=name).value
        label = f"{sampler} {steps}"
        images[label] = x
        rows.append({"sampler": sampler, "steps": int(steps), "s_per_sample": round(secs, 3), "mmd": m,
                     "ms_ssim": ms_ssim_diversity(hu_to_unit_range(x, cfg)[:, None])["mean"],
                     "lung_mse": float(masked_mse(hu_to_unit_range(x, cfg)[:, None], hu_to_unit_range(real, cfg)[:, None],
                                                  lung[:, None]).mean())})
    return {"rows": rows, "images": images, "real": real, "network": name}


def plot_samples(images: dict[str, np.ndarray], real: np.ndarray | None = None, index: int = 0,
                 vmin: float = -1000.0, vmax: float = 400.0):
    """Axial centre slice of sample ``index`` for every setting (and the real scan); returns the figure."""
    import matplotlib.pyplot as plt

    panels = ([("real (condition)", real)] if real is not None else []) + list(images.items())
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.8), squeeze=False)
    for ax, (label, x) in zip(axes[0], panels):
        vol = x[index]
        ax.imshow(vol[vol.shape[0] // 2], cmap="gray", vmin=vmin, vmax=vmax)
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return fig
