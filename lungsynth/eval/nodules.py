"""Nodule measures shared by the 3D methods' gates: nodules of a label map, their contrast against the lung
around them, and the share of generated nodules that keep enough of their real contrast.

Shapes: volumes [D, H, W] in HU, masks [D, H, W] bool; ``spacing_mm`` is the isotropic voxel side. The
texture gates of LAND and the bbox LDM read :func:`spearman` (requested texture against generated HU).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

SHELL_MM = 3.0  # the lung shell around a nodule whose mean HU is its background
MIN_NODULE_MM = 6.0  # the smallest nodule the course grids show (issue 16: >= 2 voxels across)
MIN_CONTRAST_RATIO = 0.5  # a generated nodule keeps at least half of its real contrast


def sphere_diameter_mm(voxels: int, spacing_mm: float) -> float:
    """Diameter of the sphere of ``voxels`` voxels of side ``spacing_mm``."""
    return 2.0 * (3.0 * float(voxels) / (4.0 * math.pi)) ** (1.0 / 3.0) * float(spacing_mm)


def label_nodules(label: np.ndarray, spacing_mm: float, min_mm: float = MIN_NODULE_MM) -> list[dict[str, Any]]:
    """The connected nodules of a label map [D,H,W] (> 0.5 is nodule) whose equivalent-sphere diameter is at
    least ``min_mm``: ``[{"mask": bool [D,H,W], "diameter_mm"}]``."""
    from scipy import ndimage

    labels, n = ndimage.label(np.asarray(label) > 0.5)
    out = []
    for k in range(1, n + 1):
        mask = labels == k
        diameter = sphere_diameter_mm(int(mask.sum()), spacing_mm)
        if diameter >= min_mm:
            out.append({"mask": mask, "diameter_mm": diameter})
    return out


def nodule_contrast(hu: np.ndarray, nodule: np.ndarray, lung: np.ndarray, spacing_mm: float,
                    shell_mm: float = SHELL_MM) -> float:
    """Mean HU inside ``nodule`` minus the mean HU of the lung within ``shell_mm`` around it (NaN if the
    shell holds no lung voxel). hu, nodule, lung: [D,H,W]."""
    from scipy import ndimage

    radius = max(1, int(round(shell_mm / spacing_mm)))
    grown = ndimage.binary_dilation(nodule, iterations=radius)
    shell = grown & ~nodule & np.asarray(lung, bool)
    if not shell.any() or not nodule.any():
        return float("nan")
    return float(hu[nodule].mean() - hu[shell].mean())


def contrast_share(generated: Sequence[float], real: Sequence[float],
                   min_ratio: float = MIN_CONTRAST_RATIO) -> tuple[float, int]:
    """Share of nodules whose generated contrast is at least ``min_ratio`` of the real one, and how many
    nodules were judged (those whose real contrast is positive and both are measured)."""
    kept = [(g, r) for g, r in zip(generated, real) if math.isfinite(g) and math.isfinite(r) and r > 0]
    if not kept:
        return float("nan"), 0
    return float(np.mean([g >= min_ratio * r for g, r in kept])), len(kept)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (NaN when fewer than 3 finite pairs or a constant side)."""
    from scipy.stats import spearmanr

    pairs = [(a, b) for a, b in zip(x, y) if math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3 or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
        return float("nan")
    return float(spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic)
