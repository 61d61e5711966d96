"""Lung masks: a classical pipeline, with a hook for lungmask / TotalSegmentator when available.

Classical (:func:`classical_lung_mask`), on an isotropic HU volume [D, H, W]:

1. air = HU < -400; air components touching the in-plane border are outside the body;
2. the airways are removed by region growing (HU < -950) from a seed in the trachea found in
   the most superior slices, unless the grown region leaks into the lungs;
3. the largest one or two components are kept (two when the second is at least 10% of the
   first: left and right lung), and any other component of at least 1 ml whose mean HU is
   parenchymal (above -950 HU: lung cut off from the rest, not gas);
4. morphological closing and slice-wise hole filling bring vessels, juxtapleural and solid
   nodules inside the mask.

:func:`lung_mask` tries a learned model first when ``method="auto"`` and the package with
its weights is installed (lungmask, TotalSegmentator); they download weights on first use,
which fails offline, so any failure falls back to the classical mask and says so.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _ball(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2) <= radius ** 2


def remove_airways(candidate: np.ndarray, hu: np.ndarray, spacing_mm: float,
                   threshold: float = -950.0) -> np.ndarray:
    """Airway voxels (bool [D, H, W]) grown from the trachea; empty when no trachea is found."""
    D, H, W = hu.shape
    air = candidate & (hu < threshold)
    top = max(1, int(round(30.0 / spacing_mm)))  # superior 3 cm (axis 0 is head -> feet)
    lab, n = ndimage.label(air)
    if n == 0:
        return np.zeros_like(candidate)
    best, best_score = 0, np.inf
    for idx in np.unique(lab[:top]):
        if idx == 0:
            continue
        zz, yy, xx = np.nonzero(lab[:top] == idx)
        off = abs(xx.mean() - W / 2) / W
        if off > 0.15:
            continue
        if off < best_score:
            best, best_score = idx, off
    if best == 0:
        return np.zeros_like(candidate)
    airway = lab == best
    if airway.sum() > 0.05 * candidate.sum():  # leaked into the lungs: keep only the superior part
        return np.zeros_like(candidate)
    return ndimage.binary_dilation(airway, iterations=1)


def _outside_labels(lab: np.ndarray) -> np.ndarray:
    """Labels of the air around the body: components holding a corner of some axial slice.

    Touching the in-plane border is not enough: with a tight reconstruction field of view the
    lungs themselves reach the image edge (LIDC has such scans), while the slice corners stay
    outside the body. Falls back to "touches the border" when no corner is air anywhere.
    """
    corners = np.concatenate([lab[:, 0, 0], lab[:, 0, -1], lab[:, -1, 0], lab[:, -1, -1]])
    found = np.unique(corners[corners > 0])
    if found.size:
        return found
    border = np.unique(np.concatenate([lab[:, 0, :].ravel(), lab[:, -1, :].ravel(),
                                       lab[:, :, 0].ravel(), lab[:, :, -1].ravel()]))
    return border[border > 0]


PARENCHYMA_MIN_HU = -950.0  # mean HU above which an air component is lung tissue rather than gas


def classical_lung_mask(hu: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Lung mask (bool [D, H, W]) of an isotropic HU volume [D, H, W] at ``spacing_mm``."""
    air = hu < -400
    lab, n = ndimage.label(air)
    outside = np.isin(lab, _outside_labels(lab))
    candidate = air & ~outside
    candidate &= ~remove_airways(candidate, hu, spacing_mm)
    candidate = ndimage.binary_opening(candidate, iterations=1) if spacing_mm < 3 else candidate
    lab, n = ndimage.label(candidate)
    if n == 0:
        return np.zeros_like(candidate)
    sizes = ndimage.sum(candidate, lab, index=np.arange(1, n + 1))
    order = np.argsort(sizes)[::-1]
    min_size = 1000.0 / spacing_mm ** 3  # a second lung of at least 1 ml
    keep = [order[0] + 1]
    if n > 1 and sizes[order[1]] >= 0.1 * sizes[order[0]] and sizes[order[1]] > min_size:
        keep.append(order[1] + 1)
    # A smaller component of parenchyma (not gas) is lung cut off from the rest, e.g. a pocket around a
    # nodule near the mediastinum; pure gas (bowel, an air bubble) is about -1000 HU, parenchyma -900..-600.
    means = ndimage.mean(hu, lab, index=np.arange(1, n + 1))
    keep += [int(i) + 1 for i in order[len(keep):] if sizes[i] > min_size and means[i] > PARENCHYMA_MIN_HU]
    lung = np.isin(lab, keep)
    radius = max(1, int(round(6.0 / spacing_mm)))
    pad = radius + 1
    padded = np.pad(lung, pad)
    padded = ndimage.binary_closing(padded, structure=_ball(radius))
    lung = padded[pad:-pad, pad:-pad, pad:-pad]
    for d in range(lung.shape[0]):
        lung[d] = ndimage.binary_fill_holes(lung[d])
    return lung


def slice_lung_mask(hu: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Lung mask (bool [H, W]) of one axial HU slice [H, W] at ``spacing_mm``: the 2D form of
    :func:`classical_lung_mask` (generated slices have no neighbours to follow the airways through).

    Air below -400 HU, opened once; every component of at least 1 cm^2 whose mean HU is parenchymal (above
    -950: lung, not the gas around the body or in the bowel) is kept, then closed with a 6 mm disc and
    hole-filled so vessels and nodules are inside it. Unlike the 3D mask, air reaching a corner is not
    dropped for that alone: in a window cut inside the chest (chapter 04's nodule-centred slices) the lung
    itself reaches the corners; the gas outside the body is told apart by its HU.
    """
    hu = np.asarray(hu, dtype=np.float32)
    if hu.ndim != 2:
        raise ValueError(f"slice_lung_mask takes one slice [H, W], got shape {hu.shape}")
    candidate = hu < -400
    candidate = ndimage.binary_opening(candidate) if spacing_mm < 3 else candidate
    lab, n = ndimage.label(candidate)
    if n == 0:
        return np.zeros_like(candidate)
    index = np.arange(1, n + 1)
    sizes = ndimage.sum(candidate, lab, index=index)
    means = ndimage.mean(hu, lab, index=index)
    keep = index[(sizes * spacing_mm ** 2 >= 100.0) & (means > PARENCHYMA_MIN_HU)]
    lung = np.isin(lab, keep)
    radius = max(1, int(round(6.0 / spacing_mm)))
    r = np.arange(-radius, radius + 1)
    disc = (r[:, None] ** 2 + r[None, :] ** 2) <= radius ** 2
    lung = ndimage.binary_closing(np.pad(lung, radius + 1), structure=disc)[radius + 1:-radius - 1,
                                                                             radius + 1:-radius - 1]
    return ndimage.binary_fill_holes(lung)


def _learned_lung_mask(hu: np.ndarray, spacing_mm: float) -> np.ndarray:
    """lungmask's U-Net (R231) when installed with its weights; raises when unavailable."""
    import importlib

    lm = importlib.import_module("lungmask")
    import SimpleITK as sitk  # lungmask's own dependency

    img = sitk.GetImageFromArray(hu.astype(np.int16))
    img.SetSpacing((spacing_mm,) * 3)
    seg = lm.LMInferer().apply(img) if hasattr(lm, "LMInferer") else lm.mask.apply(img)
    return np.asarray(seg) > 0


def lung_mask(hu: np.ndarray, spacing_mm: float, method: str = "classical") -> tuple[np.ndarray, str]:
    """(lung mask bool [D, H, W], method used). ``method``: classical | auto | lungmask."""
    if method in ("auto", "lungmask"):
        try:
            return _learned_lung_mask(hu, spacing_mm), "lungmask"
        except Exception as exc:  # missing package or weights (offline): fall back, say so
            if method == "lungmask":
                raise ValueError(f"lungmask is not usable here ({exc}); use --lung-mask classical") from exc
    if method not in ("auto", "classical", "lungmask"):
        raise ValueError(f"unknown lung mask method {method!r}: classical | auto | lungmask")
    return classical_lung_mask(hu, spacing_mm), "classical"
