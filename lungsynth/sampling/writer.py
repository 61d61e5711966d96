"""A synthetic dataset in the prepared format, written one sample at a time, never half-written.

Layout of a synthetic dataset D (the prepared format of notes/DATA_API.md, so the real-data loaders
read it with ``root=D``)::

    D/synth.json                      what built it (method, checkpoint, conditions, seed, config)
    D/records/<sample_id>.json        one per finished sample: provenance; written LAST (commit marker)
    D/provenance.csv                  all records as one table
    D/scans.csv, D/splits.json        volume methods: one row per sample (VolumeDataset(cfg, "train", root=D))
    D/volumes/<sample_id>_{ct,lung,label,cond,hrmask}.nii.gz
    D/nodules.csv                     one row per nodule (CropDataset / SliceDataset / RoiDataset, root=D)
    D/views/{slices,rois,crops}/<sample_id>.npz   2D and crop methods (same keys as the real views)

Every synthetic row has ``split = "train"`` (synthetic data is training material for chapters 10-11;
``condition_split`` says which real split its condition came from) and ``source = "synthetic:<method>"``.
Files are written to a temporary name and renamed; the record goes last, so a sample without a record
is simply regenerated on resume.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from lungsynth.data.conditions import UNITS, VIEW_DIRS, Condition, reader_scores_of

PROVENANCE_KEYS = ("sample_id", "index", "method", "variant", "checkpoint", "seed", "batch_seed", "position",
                   "condition_source", "condition_scan_id", "condition_nodule_id", "condition_split", "seconds")
ATTRIBUTES = ("sphericity", "margin", "lobulation", "spiculation", "texture")
SCORES = ("sphericity", "margin", "lobulation", "spiculation", "texture", "calcification", "internal_structure",
          "subtlety", "malignancy")


def _csv_atomic(df: Any, path: Path) -> None:
    tmp = path.with_name(".tmp_" + path.name)
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def _finite(name: str, arr: np.ndarray, sample_id: str) -> np.ndarray:
    arr = np.asarray(arr)
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ValueError(f"sample {sample_id}: generated {name!r} contains {int((~np.isfinite(arr)).sum())} NaN/inf "
                         f"values (a diverged sampler); nothing was written for it — check the checkpoint or "
                         f"use fewer/more sampling steps")
    return arr


def _subtype(texture: float) -> tuple[str, int]:
    t = int(round(float(texture)))
    if t <= 2:
        return "ground-glass", 2
    if t == 3:
        return "part-solid", 1
    return "solid", 0


class SyntheticWriter:
    """Writes samples of one ``unit`` into ``out`` (a synthetic dataset folder).

    Args:
        out: the dataset folder (created).
        unit: ``volume`` | ``slice`` | ``roi`` | ``crop``.
        spacing_mm: voxel spacing written into the NIfTI affines (volume unit).
    """

    def __init__(self, out: Path | str, unit: str, spacing_mm: float = 1.0) -> None:
        if unit not in UNITS:
            raise ValueError(f"unknown sample unit {unit!r}; use one of {', '.join(UNITS)}")
        self.out = Path(out)
        self.unit = unit
        self.spacing_mm = float(spacing_mm)
        (self.out / "records").mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ state

    def record_path(self, sample_id: str) -> Path:
        return self.out / "records" / f"{sample_id}.json"

    def done(self, sample_id: str) -> bool:
        """True when the sample is complete on disk (its record exists)."""
        return self.record_path(sample_id).is_file()

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted((self.out / "records").glob("*.json"))]

    # ------------------------------------------------------------------ one sample

    def write(self, sample_id: str, condition: Condition, sample: Mapping[str, Any],
              provenance: Mapping[str, Any]) -> dict[str, Any]:
        """Write one sample's files, then its record. Returns the record.

        ``sample``: ``{"arrays": {...}, "nodules": [rows] (optional), "info": {...} (optional)}``; arrays
        the sample does not give (masks) are taken from the condition. The generated image must be
        finite (NaN/inf is a ValueError naming the sample).
        """
        from lungsynth.data.preprocess import save_nifti, save_npz
        from lungsynth.runtime import write_json_atomic

        arrays = {**condition.arrays, **dict(sample.get("arrays", {}))}
        image_key = "ct" if self.unit in ("volume", "crop") else "image"
        if image_key not in sample.get("arrays", {}):
            raise ValueError(f"sample {sample_id}: the method returned no {image_key!r} array")
        arrays[image_key] = _finite(image_key, np.asarray(arrays[image_key], dtype=np.float32), sample_id)
        nodules = [dict(r) for r in (sample.get("nodules") or condition.nodules)]
        files: dict[str, str] = {}
        scan_row: dict[str, Any] | None = None
        if self.unit == "volume":
            arrays = self._volume_arrays(arrays, nodules, sample_id)
            aff = np.diag([self.spacing_mm] * 3 + [1.0])
            for key in ("ct", "lung", "label", "cond", "hrmask"):
                files[key] = f"volumes/{sample_id}_{key}.nii.gz"
                save_nifti(self.out / files[key], arrays[key], aff)
            nodules = self._volume_nodules(arrays["label"], nodules, sample_id)
            shape = arrays["ct"].shape
            scan_row = {"scan_id": sample_id, "patient_id": sample_id, "split": "train", **files,
                        "spacing_mm": self.spacing_mm, "shape": ",".join(str(s) for s in shape),
                        "n_nodules": len(nodules), "source": f"synthetic:{provenance.get('method')}"}
        else:
            keep = {"slice": ("image", "box", "lung", "mask"), "roi": ("image",), "crop": ("ct", "mask", "hrmask")}
            view = {k: np.asarray(arrays[k]) for k in keep[self.unit] if k in arrays}
            files["view"] = f"views/{VIEW_DIRS[self.unit]}/{sample_id}.npz"
            save_npz(self.out / files["view"], **view)
            nodules = [self._view_nodule(nodules[0] if nodules else {}, sample, sample_id)]
        record = {**{k: provenance.get(k) for k in PROVENANCE_KEYS}, **dict(provenance), "sample_id": sample_id,
                  "unit": self.unit, **condition.provenance(), "files": files, "scan": scan_row,
                  "nodules": [{**n, **condition.provenance(), "method": provenance.get("method")} for n in nodules],
                  "info": dict(sample.get("info", {}))}
        write_json_atomic(self.record_path(sample_id), record)
        return record

    def _volume_arrays(self, arrays: dict[str, Any], nodules: list[dict[str, Any]], sample_id: str) -> dict:
        ct = arrays["ct"]
        if ct.ndim == 4 and ct.shape[0] == 1:
            ct = ct[0]
        if ct.ndim != 3:
            raise ValueError(f"sample {sample_id}: a volume must be [D, H, W] (HU), got {ct.shape}")
        shape = ct.shape
        lung = np.asarray(arrays.get("lung", np.zeros(shape)), dtype=np.uint8).reshape(shape)
        label = np.asarray(arrays.get("label", np.zeros(shape)), dtype=np.uint8).reshape(shape)
        if "cond" in arrays:
            cond = np.asarray(arrays["cond"], dtype=np.float32).reshape(shape)
        else:
            cond = np.where(lung > 0, 0.5, 0.0).astype(np.float32)
            for r in nodules:
                cond[label == int(r.get("label_value", 0))] = float(r.get("texture", 5))
            cond /= 5.0
        hr = arrays.get("hrmask")
        if hr is None:
            hr = np.zeros(shape + (3,), dtype=np.uint8)
            hr[..., 0] = label > 0
        hr = np.asarray(hr, dtype=np.uint8)
        if hr.shape == (3,) + shape:
            hr = np.moveaxis(hr, 0, -1)
        if hr.shape != shape + (3,):
            raise ValueError(f"sample {sample_id}: hrmask {hr.shape} does not match the volume {shape}")
        return {"ct": ct.astype(np.float32), "lung": lung, "label": label, "cond": cond, "hrmask": hr}

    def _volume_nodules(self, label: np.ndarray, rows: list[dict[str, Any]], sample_id: str) -> list[dict]:
        from scipy import ndimage

        out = []
        by_value = {int(r.get("label_value", i + 1)): r for i, r in enumerate(rows)}
        for value in sorted(int(v) for v in np.unique(label) if v > 0):
            r = dict(by_value.get(value, {}))
            c = ndimage.center_of_mass(label == value)
            r.update({"nodule_id": f"{sample_id}_n{value}", "scan_id": sample_id, "patient_id": sample_id,
                      "split": "train", "label_value": value, "centroid_vox_x": round(float(c[2]), 2),
                      "centroid_vox_y": round(float(c[1]), 2), "centroid_vox_z": round(float(c[0]), 2),
                      "real_nodule_id": by_value.get(value, {}).get("nodule_id")})
            out.append(r)
        return out

    def _view_nodule(self, row: dict[str, Any], sample: Mapping[str, Any], sample_id: str) -> dict[str, Any]:
        r = dict(row)
        r["real_nodule_id"] = row.get("nodule_id")
        attrs = sample.get("attributes")  # the scores a method was conditioned on, when drawn (not a real row)
        if attrs is not None:
            r.update({k: int(v) for k, v in dict(attrs).items()})
        for k in SCORES:
            r.setdefault(k, 3)
        if attrs is not None or not reader_scores_of(row):
            r["reader_scores"] = json.dumps([{k: int(r[k]) for k in ATTRIBUTES}])
        r.setdefault("diameter_mm", float("nan"))
        r["subtype"], r["subtype_id"] = _subtype(r["texture"])
        r.update({"nodule_id": sample_id, "scan_id": sample_id, "patient_id": sample_id, "split": "train",
                  "label_value": 1})
        return r

    # ------------------------------------------------------------------ tables

    def write_tables(self) -> dict[str, int]:
        """(Re)write provenance.csv, nodules.csv (and scans.csv, splits.json for volumes) from the records."""
        import pandas as pd

        from lungsynth.runtime import write_json_atomic

        recs = self.records()
        prov = pd.DataFrame([{k: v for k, v in r.items() if k not in ("scan", "nodules", "files", "info")}
                             for r in recs])
        _csv_atomic(prov, self.out / "provenance.csv")
        nods = pd.DataFrame([n for r in recs for n in r["nodules"]])
        _csv_atomic(nods, self.out / "nodules.csv")
        if self.unit == "volume":
            scans = pd.DataFrame([{**r["scan"], **{k: r.get(k) for k in PROVENANCE_KEYS if k != "sample_id"}}
                                  for r in recs])
            _csv_atomic(scans, self.out / "scans.csv")
        write_json_atomic(self.out / "splits.json", {"train": sorted(r["sample_id"] for r in recs), "val": [],
                                                      "test": []})
        return {"samples": len(recs), "nodules": len(nods)}
