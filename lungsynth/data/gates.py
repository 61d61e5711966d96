"""Chapter 01's quality gates: the prepared views can show what the methods must learn.

- every nodule of at least :data:`VISIBLE_MM` is at least :data:`MIN_VOXELS_ACROSS` voxels across in every
  method's view (the 3D volumes of LAND and HR-LDM, Lung-DDPM's smaller cube, the 2D slices of
  chapter 04, the ROIs of chapter 07, the 1 mm crops of chapters 05 and 11);
- the nodules lie in the lung mask (at least :data:`MIN_IN_LUNG` of their voxels).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lungsynth.gates import Gate, judge

CHAPTER = "01"
VISIBLE_MM = 6.0  # the smallest nodules screening reports act on (Lung-RADS 2 / 3 boundary)
# Two voxels is the least a nodule can be and still have an inside and an edge; at one voxel it is a
# speck of partial volume that no method can place or texture.
MIN_VOXELS_ACROSS = 2.0
# Nodules are lung tissue; when under 95% of their voxels fall in the lung mask, the mask (not the
# anatomy) is cutting them away: juxtapleural nodules are the known hard case.
MIN_IN_LUNG = 0.95


def view_spacings_mm(cfg: Any, diameter_mm: np.ndarray, slice_spacing_mm: np.ndarray) -> dict[str, np.ndarray]:
    """Voxel spacing (mm) of each method's view for nodules of ``diameter_mm`` whose whole 2D slices have pixels
    of ``slice_spacing_mm`` (one value per nodule each: the slice's field of view / ``size_2d``)."""
    from lungsynth.data.preprocess import ROI_SIDE_PER_DIAMETER

    d = np.asarray(diameter_mm, dtype=float)
    dc = cfg.data
    one = np.ones_like(d)
    fov_mm = float(dc.spacing_3d_mm) * int(dc.size_3d)
    return {
        "3D volume (LAND, HR-LDM)": one * float(dc.spacing_3d_mm),
        "Lung-DDPM volume": one * fov_mm / int(dc.size_ddpm),
        "2D slice (bbox LDM)": np.asarray(slice_spacing_mm, dtype=float) * one,
        "ROI (text-to-image)": ROI_SIDE_PER_DIAMETER * d / int(dc.roi_size),
        "1 mm crop (HR-LDM, downstream)": one * 1.0,
    }


def visibility_gates(cfg: Any, nodules: Any) -> list[Gate]:
    """One gate per view: the smallest nodule of >= 6 mm, in voxels across, must reach 2."""
    big = nodules[nodules["diameter_mm"].astype(float) >= VISIBLE_MM]
    d = big["diameter_mm"].to_numpy(dtype=float)
    if "spacing_2d_mm" not in big.columns:
        raise ValueError("the nodule table has no spacing_2d_mm column (prepared before whole 2D slices); prepare "
                         f"the data again: lungsynth data default --profile {cfg.profile}")
    out = []
    for view, spacing in view_spacings_mm(cfg, d, big["spacing_2d_mm"].to_numpy(dtype=float)).items():
        across = d / spacing
        out.append(judge(CHAPTER, f"nodules >= {VISIBLE_MM:g} mm visible: {view} (min voxels across)",
                         float(across.min()) if len(across) else None, n=len(d), n_needed=1,
                         at_least=MIN_VOXELS_ACROSS,
                         detail=f"{int((across >= MIN_VOXELS_ACROSS).sum())}/{len(d)} nodules reach "
                                f"{MIN_VOXELS_ACROSS:g} voxels; spacing up to {float(spacing.max()):.2f} mm"))
    return out


def in_lung_gate(scans: Any) -> Gate:
    """Nodule voxels inside the lung mask, pooled over every prepared scan."""
    vox = scans["nodule_voxels"].astype(float).to_numpy()
    frac = scans["nodule_in_lung_fraction"].astype(float).to_numpy()
    ok = np.isfinite(frac) & (vox > 0)
    value = float((vox[ok] * frac[ok]).sum() / vox[ok].sum()) if ok.any() else None
    worst = scans.loc[ok].sort_values("nodule_in_lung_fraction").head(1)
    detail = (f"lowest scan {worst['scan_id'].iloc[0]}: {float(worst['nodule_in_lung_fraction'].iloc[0]):.2f}"
              if len(worst) else "no scan with nodule voxels")
    return judge(CHAPTER, "nodule voxels inside the lung mask (fraction)", value, n=int(ok.sum()), n_needed=1,
                 at_least=MIN_IN_LUNG, detail=detail)


def quality_gates(cfg: Any, root: Path | str | None = None) -> list[Gate]:
    """Chapter 01's gates on the prepared folder ``root`` (default the profile's; never prepares it)."""
    from lungsynth.data.datasets import load_nodules, load_scans, prepared_folder
    from lungsynth.gates import not_trained

    P = Path(root) if root is not None else prepared_folder(cfg)
    if not (P / "scans.csv").is_file():
        return [not_trained(CHAPTER, "prepared data", f"lungsynth data default --profile {cfg.profile}")]
    return visibility_gates(cfg, load_nodules(P)) + [in_lung_gate(load_scans(P))]
