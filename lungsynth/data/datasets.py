"""torch Datasets over a prepared dataset (the contract in notes/DATA_API.md), and ``ensure_prepared``.

Every dataset takes ``(cfg, split)`` and optionally ``root`` (a prepared folder P; default
:func:`prepared_folder` of ``cfg``, built on first use by :func:`ensure_prepared`).
``split`` is "train", "val", "test" or "all". Arrays are (D, H, W) = (superior -> inferior,
anterior -> posterior, right -> left), as saved by :mod:`lungsynth.data.preprocess`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lungsynth import paths
from lungsynth.data import fingerprint

VOLUME_KEYS = ("ct", "lung", "label", "cond", "hrmask", "healthy")
_ENSURED: set[tuple] = set()  # prepared datasets already checked in this process


# --------------------------------------------------------------------------- building


def preparation_settings(cfg: Any) -> dict[str, Any]:
    """``{"data.<key>": value}`` of the settings every prepared scan depends on besides its DICOM (voxel size,
    view sizes: :func:`lungsynth.data.preprocess.prepare_settings`). The scan count and the splits are not here:
    more scans are added to the same folder (a real download prepared there sets ``data.n_scans`` to its count),
    other split settings re-cut its splits; both change its data fingerprint, which trained runs check."""
    from lungsynth.data.preprocess import prepare_settings

    return {f"data.{k}": v for k, v in prepare_settings(cfg).items() if k not in ("version", "slice_view")}


def prepared_folder(cfg: Any) -> Path:
    """The prepared folder of ``cfg``: ``paths.prepared_dir(cfg.profile)`` when its preparation settings are the
    profile's, else a folder beside it named by the overrides (``prepared@spacing_3d_mm=3.0``), so that a "Try
    this" in chapter 01 never prepares the dataset every trained run of the profile was built from again."""
    shared = paths.prepared_dir(cfg.profile)
    return shared.with_name(paths.variant_name(shared.name, preparation_overrides(cfg)))


def preparation_overrides(cfg: Any) -> dict[str, Any]:
    """The :func:`preparation_settings` of ``cfg`` that differ from its profile's."""
    from lungsynth.config import get_config

    base = preparation_settings(get_config(cfg.profile))
    return {k: v for k, v in preparation_settings(cfg).items() if base.get(k) != v}


def _records_complete(P: Path, scan_keys: Sequence[str], cfg: Any) -> bool:
    from lungsynth.data.manifest import read_record
    from lungsynth.data.preprocess import _record_ok

    if not (P / "scans.csv").is_file() or not (P / "splits.json").is_file():
        return False
    for key in scan_keys:
        data = read_record(P / "records" / f"{key}.json")
        if data is None:  # missing or unreadable: prepared again
            return False
        if data.get("status") == "done" and not _record_ok(P, data, cfg):
            return False
    return True


def ensure_prepared(cfg: Any, verbose: bool = True) -> Path:
    """The prepared dataset of ``cfg.profile``: phantom DICOM + prepare when missing. Returns P.

    Idempotent and cheap when everything is in place: ``cfg.data.n_scans`` default scans
    (:func:`lungsynth.data.phantom.default_scan_ids`) rendered into
    ``paths.phantom_dicom_dir()`` and prepared into :func:`prepared_folder` of ``cfg``.
    A run record (``prepare_run.json``) is written beside the data when it is built.

    A file lock (``<P>.lock``) lets one process prepare while a second waits, then reuses its
    output. Phantom scans are never added to a folder that holds a LIDC-IDRI (DICOM) preparation:
    that is an error naming the missing scans.
    """
    from filelock import FileLock

    from lungsynth.data.lidc import get_scan, scan_key
    from lungsynth.data.manifest import manifest_current, write_manifest

    P = prepared_folder(cfg)
    memo = (str(P), int(cfg.data.n_scans), repr(cfg.data))
    if memo in _ENSURED and (P / "scans.csv").is_file():
        return P
    from lungsynth.data.phantom import default_scan_ids

    ids = default_scan_ids(int(cfg.data.n_scans), strict=False)  # full: every patient once
    keys = [scan_key(get_scan(i)) for i in ids]
    if _records_complete(P, keys, cfg) and manifest_current(P, cfg):
        _ENSURED.add(memo)
        return P
    P.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(P) + ".lock"):
        if _records_complete(P, keys, cfg):  # maybe another process just finished it
            if not manifest_current(P, cfg):  # same scans, other split settings: re-cut the splits only
                if fingerprint.read(P) is None:
                    print(f"{P}: no {fingerprint.FILENAME} (prepared before data fingerprints); rewriting its manifest")
                write_manifest(P, cfg)
        else:
            _refuse_phantom_into_dicom(P, ids, keys, cfg)
            _refuse_phantom_beside_dicom(P, cfg)
            _build_default(P, ids, keys, cfg, verbose)
    _ENSURED.add(memo)
    return P


def _refuse_phantom_into_dicom(P: Path, ids: Sequence[Any], keys: Sequence[str], cfg: Any) -> None:
    """Raise when P holds scans prepared from real DICOM: phantom and LIDC-IDRI never mix silently."""
    n_real = _real_scans(P)
    if not n_real:
        return
    missing = [str(i) for i, k in zip(ids, keys) if not _records_complete(P, [k], cfg)]
    raise ValueError(
        f"{P} holds {n_real} scans prepared from LIDC-IDRI DICOM, and the profile's default scans "
        f"{', '.join(missing)} are missing or were prepared with other settings; phantom scans are never "
        f"added to a real dataset. Prepare them from your download: `lungsynth data prepare --dicom-root ROOT "
        f"--out {P} --scans {','.join(missing)} --profile {cfg.profile}`, or set data.n_scans to the scans you have.")


def _real_scans(P: Path) -> int:
    """How many scans of the prepared folder P came from LIDC-IDRI DICOM (0 when P holds none)."""
    if not (P / "scans.csv").is_file():
        return 0
    scans = load_scans(P)
    return int((scans["source"].astype(str) != "phantom").sum()) if "source" in scans.columns else 0


def _refuse_phantom_beside_dicom(P: Path, cfg: Any) -> None:
    """Raise when overridden settings would prepare phantom scans beside a profile folder that holds LIDC-IDRI
    scans: the chapter would silently show phantom data where the learner prepared real data."""
    shared = paths.prepared_dir(cfg.profile)
    if P == shared or not _real_scans(shared):
        return
    sets = " ".join(f"--set {k}={v}" for k, v in preparation_overrides(cfg).items())
    raise ValueError(
        f"{shared} holds scans prepared from LIDC-IDRI DICOM, and the data overrides ({sets}) need their own "
        f"prepared folder {P}; phantom scans are never prepared in its place. Prepare your download there: "
        f"`lungsynth data prepare --dicom-root ROOT --out {P} --profile {cfg.profile} {sets}`, or drop the "
        "data overrides.")


def _build_default(P: Path, ids: Sequence[Any], keys: Sequence[str], cfg: Any, verbose: bool) -> None:
    from lungsynth.data.phantom import make_phantom
    from lungsynth.data.preprocess import prepare
    from lungsynth.runtime import RunRecord

    root = paths.phantom_dicom_dir()
    P.mkdir(parents=True, exist_ok=True)
    with RunRecord(P, config=cfg.data, seed=cfg.data.phantom_seed, command="ensure_prepared",
                   filename="prepare_run.json") as run:
        with run.timer("phantom"):
            make_phantom(root, ids, seed=cfg.data.phantom_seed, noise_hu=cfg.data.phantom_noise_hu,
                         render_matrix=cfg.data.phantom_render_matrix, verbose=verbose)
        with run.timer("prepare"):
            prepare(root, P, cfg, scans=ids, verbose=verbose)
        run["scans"] = list(keys)


# --------------------------------------------------------------------------- tables


def _prepared(where: Any) -> Path:
    if isinstance(where, (str, Path)) and Path(where).is_dir():
        return Path(where)
    if isinstance(where, str):
        return paths.prepared_dir(where)
    return prepared_folder(where)  # a Config


def load_scans(where: Any) -> "Any":
    """scans.csv of a profile name, a Config or a prepared folder, as a DataFrame."""
    import pandas as pd

    p = _prepared(where) / "scans.csv"
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found; run `lungsynth data default --profile PROFILE` "
                                "(or lungsynth.data.datasets.ensure_prepared(cfg))")
    return pd.read_csv(p, dtype={"shape": str, "crop_start": str, "notes": str})


def load_nodules(where: Any) -> "Any":
    """nodules.csv of a profile name, a Config or a prepared folder, as a DataFrame."""
    import pandas as pd

    p = _prepared(where) / "nodules.csv"
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found; run `lungsynth data default --profile PROFILE`")
    return pd.read_csv(p)


def _select(df: Any, split: str | None) -> Any:
    if split in (None, "all"):
        return df.reset_index(drop=True)
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}: train | val | test | all")
    return df[df["split"] == split].reset_index(drop=True)


def _root(cfg: Any, root: Path | str | None) -> Path:
    return Path(root) if root is not None else ensure_prepared(cfg)


def prepared_root(cfg: Any, root: Path | str | None = None) -> Path:
    """``root`` when given, else :func:`prepared_folder` of ``cfg`` (built on first use)."""
    return _root(cfg, root)


def data_source(cfg: Any, root: Path | str | None = None) -> str:
    """"phantom", "LIDC-IDRI" or "mixed": the source of the prepared data, for table and figure titles."""
    return fingerprint.source_label(_root(cfg, root))


def training_stamp(cfg: Any, root: Path | str | None = None, trained_on: Sequence[str] = ("train",)) -> dict[str, Any]:
    """The data stamp of a run trained on the ``trained_on`` splits of the prepared folder
    (:func:`lungsynth.data.fingerprint.stamp`)."""
    return fingerprint.stamp(_root(cfg, root), trained_on)


def load_volume(P: Path, rel: str) -> np.ndarray:
    import nibabel as nib

    return np.asanyarray(nib.load(str(Path(P) / rel)).dataobj)


def resize_volume(x: Any, size: int, kind: str) -> Any:
    """[C, D, H, W] tensor -> [C, size, size, size]; ``kind`` "image" (trilinear) or "mask".

    Masks are max-pooled when shrinking (a nodule of one voxel survives) and nearest when growing.
    """
    import torch.nn.functional as F

    if x.shape[-1] == size and x.shape[-2] == size and x.shape[-3] == size:
        return x
    x5 = x[None].float()
    if kind == "image":
        out = F.interpolate(x5, size=(size,) * 3, mode="trilinear", align_corners=False)
    elif size < x.shape[-1]:
        out = F.adaptive_max_pool3d(x5, (size,) * 3)
    else:
        out = F.interpolate(x5, size=(size,) * 3, mode="nearest")
    return out[0].to(x.dtype)


class CachedDataset:
    """Map-style base: ``_load(idx)`` runs once per item and is kept in memory; ``_finish`` may
    add per-access randomness to a copy. Subclasses set ``self.table`` (one row per item)."""

    def __init__(self) -> None:
        self._cache: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        if idx < 0:
            idx += len(self)
        if not 0 <= idx < len(self):
            raise IndexError(idx)
        if idx not in self._cache:
            self._cache[idx] = self._load(idx)
        return self._finish(idx, dict(self._cache[idx]))

    def _finish(self, idx: int, item: dict[str, Any]) -> dict[str, Any]:
        return item


class VolumeDataset(CachedDataset):
    """Whole prepared volumes. Item: each key [1,S,S,S] ("hrmask" [3,S,S,S]) and "scan_id".

    "ct" float in [0, 1] (``hu_to_unit`` with cfg.data.hu_min/hu_max), "lung"/"label" long-valued
    float tensors, "cond" float in [0, 1], "healthy" (phantom data only) as "ct" without the nodules. ``size`` resamples (default: cfg.data.size_3d, as saved).
    """

    def __init__(self, cfg: Any, split: str | None = "train", size: int | None = None,
                 keys: Sequence[str] = ("ct", "lung", "label", "cond"), root: Path | str | None = None) -> None:
        super().__init__()
        bad = [k for k in keys if k not in VOLUME_KEYS]
        if bad:
            raise ValueError(f"unknown volume keys {bad}; valid: {VOLUME_KEYS}")
        self.cfg, self.keys, self.size = cfg, tuple(keys), size
        self.root = _root(cfg, root)
        self.table = _select(load_scans(self.root), split)

    def _load(self, idx: int) -> dict[str, Any]:
        import torch

        from lungsynth.data.preprocess import hu_to_unit

        row = self.table.iloc[idx]
        item: dict[str, Any] = {"scan_id": row["scan_id"]}
        for k in self.keys:
            if not isinstance(row.get(k), str):
                raise ValueError(f"scan {row['scan_id']} has no {k!r} volume in {self.root}: only phantom scans have a "
                                 f"healthy twin (real LIDC data: use 'ct' and keep away from its 'label')")
            arr = load_volume(self.root, row[k])
            if k == "hrmask":
                t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(arr, -1, 0))).float()
            else:
                t = torch.from_numpy(np.ascontiguousarray(arr)).float()[None]
            if k in ("ct", "healthy"):
                t = hu_to_unit(t, self.cfg.data.hu_min, self.cfg.data.hu_max)
            if self.size is not None:
                t = resize_volume(t, int(self.size), "image" if k in ("ct", "healthy") else "mask")
            item[k] = t
        return item


class SliceDataset(CachedDataset):
    """2D axial slices through nodule centres (chapter 04).

    Item: "image" [1,H,W] in [0,1] (clipped to ``hu_clip``, default cfg.bbox_ldm.hu_clip),
    "box" [1,H,W] {0,1} square box, "lung" [1,H,W], "mask" [1,H,W] (the nodule), "spacing_mm" (the pixel
    side: the whole slice's field of view / H; NaN in a synthetic dataset, whose slices do not record it),
    "attributes" LongTensor[5] (sphericity, margin, lobulation, spiculation, texture; 1..5) of
    one reader drawn at random per access (torch RNG), "attributes_median" LongTensor[5],
    "nodule_id".
    """

    def __init__(self, cfg: Any, split: str | None = "train", root: Path | str | None = None,
                 hu_clip: tuple[float, float] | None = None) -> None:
        super().__init__()
        from lungsynth.data.manifest import ATTRIBUTES

        self.cfg = cfg
        self.root = _root(cfg, root)
        self.table = _select(load_nodules(self.root), split)
        default_clip = getattr(getattr(cfg, "bbox_ldm", None), "hu_clip", (cfg.data.hu_min, cfg.data.hu_max))
        self.hu_clip = tuple(hu_clip or default_clip)
        self.attributes = ATTRIBUTES

    def _load(self, idx: int) -> dict[str, Any]:
        import torch

        from lungsynth.data.preprocess import hu_to_unit

        row = self.table.iloc[idx]
        z = np.load(self.root / "views" / "slices" / f"{row['nodule_id']}.npz")
        readers = json.loads(row["reader_scores"])
        return {
            "image": hu_to_unit(torch.from_numpy(z["image"]).float()[None], *self.hu_clip),
            "box": torch.from_numpy(z["box"]).float()[None],
            "lung": torch.from_numpy(z["lung"]).float()[None],
            "mask": torch.from_numpy(z["mask"]).float()[None],
            "spacing_mm": float(z["spacing_mm"]) if "spacing_mm" in z.files else float("nan"),  # NaN: synthetic
            "_readers": torch.tensor([[r[a] for a in self.attributes] for r in readers], dtype=torch.long),
            "attributes_median": torch.tensor([int(row[a]) for a in self.attributes], dtype=torch.long),
            "nodule_id": row["nodule_id"],
        }

    def _finish(self, idx: int, item: dict[str, Any]) -> dict[str, Any]:
        import torch

        readers = item.pop("_readers")
        item["attributes"] = readers[int(torch.randint(len(readers), (1,)))]
        return item


class RoiDataset(CachedDataset):
    """Nodule ROIs (side 2 x diameter, centre slice) with scores and a prompt (chapter 07).

    Item: "image" [1,R,R] in [0,1] (cfg.data.hu_min..hu_max), "scores" dict of the medians,
    "prompt" str (:func:`lungsynth.data.prompts.write_prompt`), "nodule_id".
    """

    SCORES = ("sphericity", "margin", "lobulation", "spiculation", "texture", "calcification",
              "internal_structure", "subtlety", "malignancy")

    def __init__(self, cfg: Any, split: str | None = "train", root: Path | str | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.root = _root(cfg, root)
        self.table = _select(load_nodules(self.root), split)

    def _load(self, idx: int) -> dict[str, Any]:
        import torch

        from lungsynth.data.preprocess import hu_to_unit
        from lungsynth.data.prompts import write_prompt

        row = self.table.iloc[idx]
        img = np.load(self.root / "views" / "rois" / f"{row['nodule_id']}.npz")["image"]
        scores = {k: int(row[k]) for k in self.SCORES}
        return {"image": hu_to_unit(torch.from_numpy(img).float()[None], self.cfg.data.hu_min, self.cfg.data.hu_max),
                "scores": scores, "prompt": write_prompt(scores), "nodule_id": row["nodule_id"]}


class CropDataset(CachedDataset):
    """Nodule-centred 3D crops at 1 mm (chapters 05, 11).

    Item: "ct" [1,C,C,C] in [0,1], "mask" [1,C,C,C], "hrmask" [3,C,C,C] (nodule, solid core,
    ground glass), "subtype_id" (0 solid, 1 part-solid, 2 ground-glass), "diameter_mm",
    "malignancy" (median 1..5), "nodule_id", "scan_id", and on phantom data "healthy" [1,C,C,C] in [0,1] (the same cube
    of the scan without its nodules). ``size`` resamples (default cfg.data.crop_size).
    """

    def __init__(self, cfg: Any, split: str | None = "train", size: int | None = None,
                 root: Path | str | None = None) -> None:
        super().__init__()
        self.cfg, self.size = cfg, size
        self.root = _root(cfg, root)
        self.table = _select(load_nodules(self.root), split)

    def _load(self, idx: int) -> dict[str, Any]:
        import torch

        from lungsynth.data.preprocess import hu_to_unit

        row = self.table.iloc[idx]
        z = np.load(self.root / "views" / "crops" / f"{row['nodule_id']}.npz")
        ct = hu_to_unit(torch.from_numpy(z["ct"]).float()[None], self.cfg.data.hu_min, self.cfg.data.hu_max)
        mask = torch.from_numpy(z["mask"]).float()[None]
        hr = torch.from_numpy(z["hrmask"]).float()
        healthy = (hu_to_unit(torch.from_numpy(z["healthy"]).float()[None], self.cfg.data.hu_min, self.cfg.data.hu_max)
                   if "healthy" in z.files else None)
        if self.size is not None:
            ct = resize_volume(ct, int(self.size), "image")
            mask = resize_volume(mask, int(self.size), "mask")
            hr = resize_volume(hr, int(self.size), "mask")
            healthy = None if healthy is None else resize_volume(healthy, int(self.size), "image")
        item = {"ct": ct, "mask": mask, "hrmask": hr, "subtype_id": int(row["subtype_id"]),
                "diameter_mm": float(row["diameter_mm"]), "malignancy": int(row["malignancy"]),
                "nodule_id": row["nodule_id"], "scan_id": str(row["scan_id"])}
        if healthy is not None:
            item["healthy"] = healthy
        return item
