"""Nodule crops of whole volumes, for comparing the methods that make nodules at the level their papers judge.

HR-LDM inpaints one nodule into a scan that is otherwise real, so a whole-volume FID says little about it; its
paper compares nodule crops. The leaderboard therefore also compares every volume method that makes nodules on
crops around its *generated* nodules, against crops around the real held-out nodules.

Resolution parity: the real crops are cut from the held-out volumes brought to the synthetic volumes' grid (same
shape, same spacing), with the same :func:`lungsynth.data.patches.cut_crop`, so a real and a synthetic crop differ
only by what is in them, never by how sharp they are (the 1 mm crop views of the prepared data are finer than a
2 mm synthetic volume).

Shapes: volumes and masks [N, D, H, W] (HU, masks 0/1); crops [M, C, C, C] at 1 mm.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from lungsynth.data.patches import cut_crop


def is_generated(row: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a nodule row of a synthetic sample is a generated nodule.

    A method that pastes a generated nodule into a real scan (HR-LDM) flags it ``inpainted``; the scan's own
    nodules beside it are real. Where no row of the sample carries the flag (whole generated volumes: LAND,
    Lung-DDPM) every nodule is generated.
    """
    if not any("inpainted" in r for r in rows):
        return True
    return str(row.get("inpainted", "")).strip().lower() in ("true", "1", "1.0")


def generated_centres(records: Sequence[Mapping[str, Any]]) -> list[list[dict[str, Any]]]:
    """Per synthetic sample (provenance records in sample order), its generated nodules:
    ``{"centre": (z, y, x) voxels, "subtype": int, "id": str}``."""
    out = []
    for rec in records:
        rows = list(rec.get("nodules") or [])
        out.append([{"centre": (float(r["centroid_vox_z"]), float(r["centroid_vox_y"]), float(r["centroid_vox_x"])),
                     "subtype": int(r.get("subtype_id", -1)), "id": str(r.get("nodule_id", rec.get("sample_id")))}
                    for r in rows if is_generated(r, rows) and "centroid_vox_z" in r])
    return out


def real_centres(nodules: Any, scan_ids: Sequence[str], scale: Sequence[float]) -> list[list[dict[str, Any]]]:
    """Per real scan of ``scan_ids``, its nodules from a prepared ``nodules.csv`` table, centroids multiplied by
    ``scale`` (d, h, w): the factor from the prepared grid to the grid the volumes were resized to."""
    by_scan = {str(s): g for s, g in nodules.groupby(nodules["scan_id"].astype(str))}
    out = []
    for sid in scan_ids:
        g = by_scan.get(str(sid))
        rows = [] if g is None else g.to_dict("records")
        out.append([{"centre": (float(r["centroid_vox_z"]) * scale[0], float(r["centroid_vox_y"]) * scale[1],
                                float(r["centroid_vox_x"]) * scale[2]),
                     "subtype": int(r["subtype_id"]), "id": str(r["nodule_id"])} for r in rows])
    return out


def cut_nodule_crops(volumes: np.ndarray, masks: np.ndarray | None, centres: Sequence[Sequence[Mapping[str, Any]]],
                     spacing_mm: float, size: int) -> dict[str, Any]:
    """One ``size``^3 crop at 1 mm around every nodule of ``centres`` (one list per volume of ``volumes``).

    Returns a leaderboard item set: ``{"image" [M, C, C, C] HU, "mask" [M, C, C, C] | None, "lung": None,
    "subtype" [M], "ids" [M]}`` (M = 0 gives empty arrays of the crop shape).
    """
    if len(centres) != len(volumes):
        raise ValueError(f"{len(centres)} nodule lists for {len(volumes)} volumes")
    images, crops_mask, subtypes, ids = [], [], [], []
    for k, nodules in enumerate(centres):
        label = masks[k] if masks is not None else np.zeros(volumes[k].shape, np.float32)
        for n in nodules:
            ct, m = cut_crop(np.asarray(volumes[k], np.float32), label, n["centre"], float(spacing_mm), int(size))
            images.append(ct)
            crops_mask.append(m)
            subtypes.append(int(n["subtype"]))
            ids.append(str(n["id"]))
    empty = np.zeros((0,) + (int(size),) * 3, np.float32)
    return {"image": np.stack(images) if images else empty,
            "mask": (np.stack(crops_mask) if crops_mask else empty) if masks is not None else None,
            "lung": None, "subtype": np.array(subtypes, dtype=int), "ids": ids}
