"""Item tables and datasets of the downstream chapters: real and synthetic data treated alike.

An *item table* (a pandas DataFrame) has one row per training or evaluation item and says where its
arrays are, so the mixer (:mod:`lungsynth.downstream.mixing`) can combine real and synthetic items by
rows before anything is loaded. Columns common to both units:

``item_id, root, scan_id, patient_id, split, synthetic (bool), source ("real" | "synthetic:<method>"),
condition_scan_id, condition_patient, condition_split`` (the last three: the real scan whose masks
conditioned a synthetic item, read from ``provenance.csv``; empty for real items).

- ``volume`` items (one per scan; chapter 10 whole-volume segmentation): ``ct, label`` (NIfTI paths
  relative to ``root``), ``spacing_mm``.
- ``nodule`` items (one per nodule; chapter 10 crops, chapter 11): ``nodule_id, label_value,
  centroid_vox_z/y/x, spacing_mm, ct, label, subtype_id, diameter_mm, malignancy`` and ``view`` (the
  crop view's npz relative to ``root`` when it exists; otherwise the crop is cut from the volume, brought first
  to ``crop_from_mm`` when that column asks for a coarser grid: :func:`same_resolution`).

A synthetic dataset (chapter 08, :mod:`lungsynth.sampling.writer`) is checked by
:func:`validate_synthetic`: a folder in another format, or with labels outside the known sets, is a
``ValueError`` that says what is wrong and how to fix it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lungsynth.data.datasets import CachedDataset
from lungsynth.data.patches import coarsen, cut_crop  # noqa: F401  (the crops of the item datasets)

SUBTYPES: tuple[str, ...] = ("solid", "part-solid", "ground-glass")  # subtype_id 0, 1, 2 (DATA_API.md)
UNITS_FOR: dict[str, tuple[str, ...]] = {"volume": ("volume",), "nodule": ("volume", "crop")}
ITEM_UNITS: tuple[str, ...] = ("volume", "nodule")


def _read_csv(path: Path, what: str) -> Any:
    import pandas as pd

    if not path.is_file():
        raise ValueError(f"{path.parent} is not a dataset in the prepared format: {path.name} is missing ({what}); "
                         f"build synthetic datasets with `lungsynth synth` (chapter 08)")
    return pd.read_csv(path, dtype={"shape": str, "crop_start": str, "notes": str})


def _patients_of(real_root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """scan_id -> patient_id and nodule_id -> patient_id of a real prepared dataset."""
    from lungsynth.data.datasets import load_nodules, load_scans

    scans = load_scans(real_root)
    nods = load_nodules(real_root)
    return (dict(zip(scans["scan_id"].astype(str), scans["patient_id"].astype(str))),
            dict(zip(nods["nodule_id"].astype(str), nods["patient_id"].astype(str))))


def heldout_patients(real_root: Path | str, splits: Sequence[str] = ("test",)) -> set[str]:
    """Patient ids of the real dataset's ``splits`` (from splits.json): who must never be in training."""
    path = Path(real_root) / "splits.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; point real_root at a prepared dataset")
    table = json.loads(path.read_text())
    return {str(p) for s in splits for p in table.get(s, [])}


# --------------------------------------------------------------------------- real items


def real_items(root: Path | str, unit: str, splits: Sequence[str] = ("train",)) -> Any:
    """The item table of a real prepared dataset: ``unit`` "volume" (scans) or "nodule" (nodules) of ``splits``."""
    import pandas as pd

    from lungsynth.data.datasets import load_nodules, load_scans

    if unit not in ITEM_UNITS:
        raise ValueError(f"unknown item unit {unit!r}; use one of {', '.join(ITEM_UNITS)}")
    root = Path(root)
    scans = load_scans(root)
    scans = scans[scans["split"].isin(list(splits))]
    common = {"root": str(root), "synthetic": False, "source": "real", "condition_scan_id": None,
              "condition_patient": None, "condition_split": None}
    if unit == "volume":
        df = pd.DataFrame({"item_id": scans["scan_id"].astype(str), "scan_id": scans["scan_id"].astype(str),
                           "patient_id": scans["patient_id"].astype(str), "split": scans["split"],
                           "ct": scans["ct"], "label": scans["label"],
                           "spacing_mm": scans["spacing_mm"].astype(float)})
        for k, v in common.items():
            df[k] = v
        return df.reset_index(drop=True)
    nods = load_nodules(root)
    nods = nods[nods["split"].isin(list(splits))]
    df = _nodule_table(nods, scans, root)
    for k, v in common.items():
        df[k] = v
    return df.reset_index(drop=True)


def _nodule_table(nods: Any, scans: Any, root: Path) -> Any:
    import pandas as pd

    by_scan = scans.set_index(scans["scan_id"].astype(str))
    rows = []
    for r in nods.to_dict("records"):
        sid = str(r["scan_id"])
        view = f"views/crops/{r['nodule_id']}.npz"
        s = by_scan.loc[sid] if sid in by_scan.index else None
        rows.append({"item_id": str(r["nodule_id"]), "nodule_id": str(r["nodule_id"]), "scan_id": sid,
                     "patient_id": str(r["patient_id"]), "split": r["split"],
                     "label_value": int(r.get("label_value", 1)),
                     "centroid_vox_z": float(r.get("centroid_vox_z", np.nan)),
                     "centroid_vox_y": float(r.get("centroid_vox_y", np.nan)),
                     "centroid_vox_x": float(r.get("centroid_vox_x", np.nan)),
                     "spacing_mm": float(s["spacing_mm"]) if s is not None else float("nan"),
                     "ct": s["ct"] if s is not None else None, "label": s["label"] if s is not None else None,
                     "view": view if (root / view).is_file() else None,
                     "subtype_id": int(r["subtype_id"]), "diameter_mm": float(r.get("diameter_mm", np.nan)),
                     "malignancy": float(r.get("malignancy", np.nan))})
    return pd.DataFrame(rows)


def in_size_range(table: Any, size_range_mm: Sequence[float] | None) -> np.ndarray:
    """Per row of a nodule item table, whether its ``diameter_mm`` lies in ``size_range_mm`` (inclusive; HR-LDM
    Sec. 5.1 keeps the 6-30 mm nodules of LIDC-IDRI). Rows of unknown diameter (NaN, or 0 where a synthetic dataset
    recorded none) are kept: their size cannot be read. None or an empty range keeps every row."""
    if not size_range_mm:
        return np.ones(len(table), dtype=bool)
    lo, hi = (float(v) for v in size_range_mm)
    if not 0 <= lo <= hi:
        raise ValueError(f"size range {tuple(size_range_mm)} mm: give (low, high) with 0 <= low <= high")
    d = table["diameter_mm"].astype(float).to_numpy()
    return ~np.isfinite(d) | (d <= 0) | ((d >= lo) & (d <= hi))


# --------------------------------------------------------------------------- synthetic items


def validate_synthetic(path: Path | str, unit: str) -> dict[str, Any]:
    """Check that ``path`` is a synthetic dataset usable for ``unit`` items; returns its synth.json.

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: not in the prepared format (synth.json, provenance.csv, nodules.csv, scans.csv for
            volumes, the files they name), a sample unit the task cannot use (slice/ROI datasets for 3D
            tasks), rows not in the train split, or labels outside the known sets (subtype_id 0/1/2 with
            the matching subtype name, malignancy 1..5, label_value >= 1).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"synthetic dataset {path} not found; build it with `lungsynth synth --method M "
                                f"--conditions sampler --out {path}`")
    meta_path = path / "synth.json"
    if not meta_path.is_file():
        raise ValueError(f"{path} is not a synthetic dataset: synth.json is missing (wrong format; build it with "
                         f"`lungsynth synth`, chapter 08)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{meta_path} is not valid JSON ({exc}); rebuild the dataset with `lungsynth synth`") from exc
    allowed = UNITS_FOR[unit]
    if meta.get("unit") not in allowed:
        raise ValueError(f"{path} holds {meta.get('unit')!r} samples ({meta.get('method')}); {unit} items need a "
                         f"{' or '.join(allowed)} dataset (3D methods: land, hr_ldm, lung_ddpm)")
    prov = _read_csv(path / "provenance.csv", "one row per sample with its condition")
    nods = _read_csv(path / "nodules.csv", "one row per nodule")
    for col in ("sample_id", "condition_scan_id", "condition_split"):
        if col not in prov.columns:
            raise ValueError(f"{path / 'provenance.csv'} has no {col!r} column (wrong format); rebuild the dataset "
                             f"with `lungsynth synth`")
    need = ["nodule_id", "scan_id", "split", "subtype_id", "subtype", "label_value"]
    if meta["unit"] == "volume":
        need += ["centroid_vox_z", "centroid_vox_y", "centroid_vox_x"]
        scans = _read_csv(path / "scans.csv", "one row per volume")
        for col in ("scan_id", "ct", "label", "spacing_mm", "split"):
            if col not in scans.columns:
                raise ValueError(f"{path / 'scans.csv'} has no {col!r} column (wrong format)")
        missing = [f for k in ("ct", "label") for f in scans[k].astype(str) if not (path / f).is_file()]
        if missing:
            raise ValueError(f"{path}: {len(missing)} volume files named in scans.csv are missing "
                             f"(first: {missing[0]}); resume the dataset with `lungsynth synth` (same --out)")
        bad_split = sorted(set(scans["split"].astype(str)) - {"train"})
        if bad_split:
            raise ValueError(f"{path / 'scans.csv'}: synthetic rows must all be in the train split, found {bad_split}")
    miss_cols = [c for c in need if c not in nods.columns]
    if miss_cols and len(nods):
        raise ValueError(f"{path / 'nodules.csv'} lacks columns {miss_cols} (wrong format); rebuild the dataset "
                         f"with `lungsynth synth`")
    if len(nods):
        _check_labels(nods, path / "nodules.csv")
        if meta["unit"] == "crop":
            lost = [n for n in nods["nodule_id"].astype(str) if not (path / "views" / "crops" / f"{n}.npz").is_file()]
            if lost:
                raise ValueError(f"{path}: crop views missing for {len(lost)} nodules (first: {lost[0]}); resume "
                                 f"the dataset with `lungsynth synth` (same --out)")
    return meta


def _check_labels(nods: Any, where: Path) -> None:
    import pandas as pd

    sid = pd.to_numeric(nods["subtype_id"], errors="coerce")
    bad = sorted({str(v) for v, s in zip(nods["subtype_id"], sid) if not (s in (0, 1, 2))})
    if bad:
        raise ValueError(f"{where}: unknown subtype_id values {bad}; expected 0 (solid), 1 (part-solid), "
                         f"2 (ground-glass)")
    names = nods["subtype"].astype(str)
    wrong = sorted({f"{n}/{int(s)}" for n, s in zip(names, sid) if n not in SUBTYPES or SUBTYPES[int(s)] != n})
    if wrong:
        raise ValueError(f"{where}: unknown or inconsistent subtype labels {wrong} (subtype/subtype_id); expected "
                         f"{', '.join(f'{n}/{i}' for i, n in enumerate(SUBTYPES))}")
    lv = pd.to_numeric(nods["label_value"], errors="coerce")
    if (~(lv >= 1)).any():
        raise ValueError(f"{where}: label_value must be an integer >= 1, got {sorted(set(nods['label_value'][~(lv >= 1)].astype(str)))}")
    if "malignancy" in nods.columns:
        m = pd.to_numeric(nods["malignancy"], errors="coerce")
        badm = sorted({str(v) for v, x in zip(nods["malignancy"], m) if pd.notna(x) and not 1 <= x <= 5})
        if badm:
            raise ValueError(f"{where}: malignancy scores {badm} outside the LIDC scale 1..5")


def generated_nodules(nods: Any) -> Any:
    """The rows of a synthetic ``nodules.csv`` that are generated nodules.

    A method that pastes a generated nodule into a real scan (HR-LDM) flags it ``inpainted``; the scan's own
    nodules, written beside it so the label map stays whole, are real and never synthetic items. Datasets
    without the column (whole generated volumes: LAND, Lung-DDPM) are generated throughout.
    """
    from lungsynth.eval.nodule_crops import is_generated

    if "inpainted" not in nods.columns:
        return nods
    rows = nods.to_dict("records")
    return nods[np.array([is_generated(r, rows) for r in rows], dtype=bool)]


def synthetic_items(path: Path | str, unit: str, real_root: Path | str) -> Any:
    """The item table of a synthetic dataset, with each item's condition patient read from provenance.

    ``real_root`` is the real prepared dataset the conditions came from; a condition scan not in it is
    a ValueError (the synthetic dataset was built from another prepared dataset).
    """
    import pandas as pd

    if unit not in ITEM_UNITS:
        raise ValueError(f"unknown item unit {unit!r}; use one of {', '.join(ITEM_UNITS)}")
    path = Path(path)
    meta = validate_synthetic(path, unit)
    prov = _read_csv(path / "provenance.csv", "provenance").set_index("sample_id")
    scan_patient, nodule_patient = _patients_of(Path(real_root))
    source = f"synthetic:{meta.get('method')}"

    def condition_of(sample_id: str) -> dict[str, Any]:
        if sample_id not in prov.index:
            raise ValueError(f"{path / 'provenance.csv'} has no row for sample {sample_id}: every synthetic item "
                             f"needs its provenance (rebuild the tables with `lungsynth synth`, same --out)")
        p = prov.loc[sample_id]
        cscan = p.get("condition_scan_id")
        cnod = p.get("condition_nodule_id")
        patient = None
        if isinstance(cscan, str) and cscan:
            if cscan not in scan_patient:
                raise ValueError(f"{path}: sample {sample_id} was conditioned on scan {cscan}, which is not in the "
                                 f"real dataset {real_root}; pass the prepared dataset it was built from")
            patient = scan_patient[cscan]
        elif isinstance(cnod, str) and cnod:
            patient = nodule_patient.get(cnod)
        csplit = p.get("condition_split")
        return {"condition_scan_id": cscan if isinstance(cscan, str) else None, "condition_patient": patient,
                "condition_split": csplit if isinstance(csplit, str) else None}

    if unit == "volume":
        scans = _read_csv(path / "scans.csv", "volumes")
        rows = [{"item_id": str(r["scan_id"]), "scan_id": str(r["scan_id"]), "patient_id": str(r["scan_id"]),
                 "split": "train", "ct": r["ct"], "label": r["label"], "spacing_mm": float(r["spacing_mm"]),
                 **condition_of(str(r["scan_id"]))} for r in scans.to_dict("records")]
        df = pd.DataFrame(rows)
    else:
        nods = _read_csv(path / "nodules.csv", "nodules")
        if meta["unit"] == "volume":
            scans = _read_csv(path / "scans.csv", "volumes")
        else:
            scans = pd.DataFrame(columns=["scan_id", "ct", "label", "spacing_mm"])
        if "malignancy" not in nods.columns:
            nods["malignancy"] = np.nan
        nods = generated_nodules(nods)
        df = _nodule_table(nods.assign(patient_id=nods["scan_id"].astype(str)), scans, path)
        if len(df):
            cond = pd.DataFrame([condition_of(s) for s in df["scan_id"]])
            df = pd.concat([df.reset_index(drop=True), cond], axis=1)
    if not len(df):
        raise ValueError(f"{path} holds no {unit} items; synthesize more samples into it")
    df["root"] = str(path)
    df["synthetic"] = True
    df["source"] = source
    df["generator"] = path.name  # the folder: one set of arms per synthetic dataset (two LAND variants stay apart)
    return df.reset_index(drop=True)


# --------------------------------------------------------------------------- torch datasets


def _load_nifti(root: str, rel: str) -> np.ndarray:
    from lungsynth.data.datasets import load_volume

    return np.asarray(load_volume(Path(root), rel), dtype=np.float32)


def same_resolution(*tables: Any) -> tuple[Any, ...]:
    """The nodule item tables with every crop cut the same way: from its volume, brought to the coarsest volume
    spacing among them (``crop_from_mm``), never from a real nodule's 1 mm crop view. Synthetic volumes are coarser
    than the views cut from the original CT, a difference a network can learn instead of the nodule."""
    spacing = max(float(t["spacing_mm"].max()) for t in tables if len(t))
    return tuple(t.assign(view=None, crop_from_mm=spacing) for t in tables)


def central_crop(view: Path, size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The central ``size``^3 of a 1 mm crop view (``ct`` in HU, ``mask`` > 0), or None when the view is smaller
    than ``size`` on any axis (the item is then cut from its volume)."""
    with np.load(view) as z:
        ct, mask = np.asarray(z["ct"], dtype=np.float32), np.asarray(z["mask"]) > 0
    if min(ct.shape) < size:
        return None
    box = tuple(slice((n - size) // 2, (n - size) // 2 + size) for n in ct.shape)
    return np.ascontiguousarray(ct[box]), mask[box].astype(np.float32)


class ItemDataset(CachedDataset):
    """A map-style dataset over an item table (real and synthetic rows alike), cached in memory.

    Args:
        cfg: the config (HU window ``cfg.data.hu_min/hu_max``).
        table: an item table (:func:`real_items`, :func:`synthetic_items`, or a mix of them).
        kind: ``"volume"``: item ``image`` [1,S,S,S] in [0,1] and ``target`` [1,S,S,S] (nodule voxels),
            volumes resampled to ``size`` (masks max-pooled); ``"crop"``: a nodule-centred crop of
            ``size``^3 at 1 mm (the centre of the crop view when the dataset has one that large,
            :func:`central_crop`; else cut from the volume), with ``subtype_id``, ``diameter_mm``, ``malignancy``.
        size: cube side.
        store: a dict shared by several datasets over overlapping tables (the trainings of one experiment):
            each item is loaded once per (root, item_id, kind, size), whichever dataset asks first.
    Items also carry ``index`` (the row) and ``synthetic`` (0/1).
    """

    def __init__(self, cfg: Any, table: Any, kind: str, size: int, store: dict | None = None) -> None:
        if kind not in ("volume", "crop"):
            raise ValueError(f"unknown item kind {kind!r}; use volume or crop")
        if len(table) == 0:
            raise ValueError("an empty item table: nothing to train or evaluate on")
        self.cfg, self.kind, self.size = cfg, kind, int(size)
        super().__init__()
        self.table = table.reset_index(drop=True)
        self._volumes: dict[tuple[str, str], Any] = {}  # volumes as read, and (ct, label) pairs coarsened
        self._store = store

    def _volume(self, root: str, rel: str) -> np.ndarray:
        key = (root, rel)
        if key not in self._volumes:
            self._volumes[key] = _load_nifti(root, rel)
        return self._volumes[key]

    def _coarse(self, root: str, ct: str, label: str, spacing: float, to_mm: float) -> tuple[np.ndarray, np.ndarray]:
        key = (root, f"{ct}@{to_mm}")
        if key not in self._volumes:
            self._volumes[key] = coarsen(self._volume(root, ct), self._volume(root, label), spacing, to_mm)
        return self._volumes[key]

    def _load(self, idx: int) -> dict[str, Any]:
        if self._store is None:
            return self._read(idx)
        r = self.table.iloc[idx]
        key = (str(r["root"]), str(r["item_id"]), self.kind, self.size)
        if key not in self._store:
            self._store[key] = self._read(idx)
        return {**self._store[key], "index": idx}

    def _read(self, idx: int) -> dict[str, Any]:
        import torch

        from lungsynth.data.datasets import resize_volume
        from lungsynth.data.preprocess import hu_to_unit

        r = self.table.iloc[idx]
        lo, hi = self.cfg.data.hu_min, self.cfg.data.hu_max
        if self.kind == "volume":
            ct = torch.from_numpy(self._volume(r["root"], r["ct"]))[None]
            lab = torch.from_numpy((self._volume(r["root"], r["label"]) > 0).astype(np.float32))[None]
            return {"image": resize_volume(hu_to_unit(ct, lo, hi), self.size, "image"),
                    "target": resize_volume(lab, self.size, "mask"), "index": idx, "synthetic": int(r["synthetic"])}
        view = r.get("view")
        cropped = central_crop(Path(r["root"]) / view, self.size) if isinstance(view, str) and view else None
        if cropped is not None:  # the view's centre, at its own 1 mm: the same field as a crop cut from the volume
            ct, mask = (torch.from_numpy(a)[None] for a in cropped)
        elif isinstance(view, str) and view and not isinstance(r.get("ct"), str):  # a view smaller than asked
            with np.load(Path(r["root"]) / view) as z:
                ct = torch.from_numpy(np.asarray(z["ct"], dtype=np.float32))[None]
                mask = torch.from_numpy((np.asarray(z["mask"]) > 0).astype(np.float32))[None]
            ct, mask = resize_volume(ct, self.size, "image"), resize_volume(mask, self.size, "mask")
        else:
            if not isinstance(r.get("ct"), str):
                raise ValueError(f"nodule {r['item_id']} in {r['root']} has neither a crop view nor a volume")
            c = (r["centroid_vox_z"], r["centroid_vox_y"], r["centroid_vox_x"])
            ct_vol, lab_vol = self._volume(r["root"], r["ct"]), self._volume(r["root"], r["label"])
            spacing = float(r["spacing_mm"])
            to_mm = float(r.get("crop_from_mm", spacing))
            if np.isfinite(to_mm) and to_mm > spacing * (1 + 1e-6):  # same_resolution: a finer volume coarsened
                ct_vol, lab_vol = self._coarse(r["root"], r["ct"], r["label"], spacing, to_mm)
                c, spacing = tuple(float(v) * spacing / to_mm for v in c), to_mm
            a, m = cut_crop(ct_vol, lab_vol, c, spacing, self.size)
            ct, mask = torch.from_numpy(a)[None], torch.from_numpy(m)[None]
        malig = float(r["malignancy"]) if np.isfinite(float(r["malignancy"])) else 0.0
        return {"image": hu_to_unit(ct, lo, hi), "target": mask, "subtype_id": int(r["subtype_id"]),
                "diameter_mm": float(r["diameter_mm"]) if np.isfinite(float(r["diameter_mm"])) else 0.0,
                "malignancy": malig, "index": idx, "synthetic": int(r["synthetic"])}



class PatchDataset:
    """Random ``patch``^3 training patches of a volume :class:`ItemDataset`, half of them centred on a target voxel.

    MONAI's ``RandCropByPosNegLabel`` (pos = neg = 1) picks each patch's centre: a nodule voxel or a
    background voxel with equal odds, so a network sees nodules in every other patch although they fill
    about 0.1% of a chest. Item: ``image`` and ``target`` [1, patch, patch, patch] (plus the base item's
    ``index`` and ``synthetic``); a fresh patch on every access, reproducible from ``seed``.
    """

    def __init__(self, base: ItemDataset, patch: int, seed: int = 0) -> None:
        from monai.transforms import RandCropByPosNegLabel

        if base.kind != "volume":
            raise ValueError(f"patches are cut from volume items, not {base.kind!r} items")
        if not 0 < int(patch) <= base.size:
            raise ValueError(f"patch side {patch} must be in 1..{base.size} (the volume side)")
        self.base, self.patch = base, int(patch)
        self.table = base.table
        self._crop = RandCropByPosNegLabel((self.patch,) * 3, pos=1.0, neg=1.0, num_samples=1, allow_smaller=False)
        self._crop.set_random_state(seed=int(seed))

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        import torch

        item = self.base[idx]
        # one draw of the centre for both tensors: crop their concatenation, the label guiding the draw
        both = self._crop(torch.cat([item["image"], item["target"]]), label=item["target"])[0]
        both = both.as_tensor() if hasattr(both, "as_tensor") else both  # MetaTensor -> Tensor for the engine
        return {**item, "image": both[:1].clone(), "target": both[1:].clone()}


class LabelView:
    """A view of an :class:`ItemDataset` whose ``label`` is ``labels[i]`` (malignancy classes, say)."""

    def __init__(self, base: ItemDataset, labels: Sequence[int]) -> None:
        if len(labels) != len(base):
            raise ValueError(f"{len(labels)} labels for {len(base)} items")
        self.base, self.labels = base, [int(v) for v in labels]

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        item = self.base[idx]
        item["label"] = self.labels[idx]
        return item
