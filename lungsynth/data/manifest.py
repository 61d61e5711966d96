"""The prepared dataset's tables: scans.csv, nodules.csv, skipped.csv, splits.json; prompts.

Built from the per-scan records (``P/records/<scan_id>.json``) so the manifest is always
consistent with what is on disk. Splits are by patient (no patient in two splits) and
deterministic for ``cfg.data.split_seed``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from lungsynth.data import fingerprint

SCAN_COLUMNS = ("scan_id", "patient_id", "split", "ct", "lung", "label", "cond", "hrmask", "healthy", "spacing_mm",
                "shape", "n_nodules", "source")
NODULE_COLUMNS = ("nodule_id", "scan_id", "patient_id", "split", "label_value", "centroid_vox_x", "centroid_vox_y",
                  "centroid_vox_z", "diameter_mm", "volume_mm3", "texture", "subtype", "subtype_id", "sphericity",
                  "margin", "lobulation", "spiculation", "calcification", "internal_structure", "subtlety",
                  "malignancy", "reader_scores", "spacing_2d_mm")
ATTRIBUTES = ("sphericity", "margin", "lobulation", "spiculation", "texture")  # chapter 04's five


def patient_splits(patients: Sequence[str], fractions: Sequence[float] = (0.7, 0.2, 0.1),
                   seed: int = 0, strata: Mapping[str, Any] | None = None) -> dict[str, list[str]]:
    """Patient ids -> {"train", "val", "test"}; with >= 3 patients each split gets at least one.

    With ``strata`` (patient -> label, e.g. a malignancy class), the patients of every label are
    spread over the splits in proportion to ``fractions`` (a stratified split: chapter 07's
    "7:2:1 with malignancy balanced"); without, one seeded shuffle is cut by the fractions.
    """
    pats = sorted(set(patients))
    rng = np.random.default_rng(seed)
    f = np.asarray(fractions, dtype=float) / sum(fractions)
    n = len(pats)
    if strata is None:
        order = [pats[i] for i in rng.permutation(n)]
        n_val, n_test = int(round(f[1] * n)), int(round(f[2] * n))
        if n >= 3:
            n_val, n_test = max(n_val, 1), max(n_test, 1)
        n_val = min(n_val, n)
        n_test = min(n_test, n - n_val)
        return {"train": sorted(order[n_val + n_test:]), "val": sorted(order[:n_val]),
                "test": sorted(order[n_val:n_val + n_test])}
    names = ("train", "val", "test")
    total, split_of = np.zeros(3), {}
    for label in sorted({str(strata.get(p, "")) for p in pats}):
        group = [p for p in pats if str(strata.get(p, "")) == label]
        local = np.zeros(3)
        for p in (group[i] for i in rng.permutation(len(group))):
            # the split furthest below its share within this label; ties go to the overall deficit
            k = int(np.argmax(f * (local.sum() + 1) - local + 1e-3 * (f * (total.sum() + 1) - total)))
            local[k] += 1
            total[k] += 1
            split_of[p] = k
    for k in (1, 2):  # every split non-empty when possible, taken from the largest split
        if n >= 3 and total[k] == 0:
            donor = int(np.argmax(total))
            moved = sorted(p for p, s in split_of.items() if s == donor)[-1]
            split_of[moved], total[donor], total[k] = k, total[donor] - 1, 1
    return {name: sorted(p for p, s in split_of.items() if s == k) for k, name in enumerate(names)}


def malignancy_class(malignancy: float) -> str:
    """LIDC malignancy median -> "benign" (< 3), "indeterminate" (3) or "malignant" (> 3)."""
    return "benign" if malignancy < 2.5 else ("malignant" if malignancy > 3.5 else "indeterminate")


def patient_strata(records: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Each patient's malignancy class, from their most suspicious nodule ("none" without nodules)."""
    worst: dict[str, float] = {}
    for r in records:
        pid = r["scan"]["patient_id"]
        scores = [float(n["malignancy"]) for n in r["nodules"] if n.get("malignancy") is not None]
        worst[pid] = max([worst.get(pid, -1.0), *scores])
    return {p: (malignancy_class(m) if m >= 0 else "none") for p, m in worst.items()}


def read_record(path: Path) -> dict[str, Any] | None:
    """One scan's record, or None when it is unreadable (cut short, corrupt): the scan is prepared again."""
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) and "status" in rec and "scan" in rec else None


def read_records(prepared: Path) -> list[dict[str, Any]]:
    recs = []
    for path in sorted((Path(prepared) / "records").glob("*.json")):
        rec = read_record(path)
        if rec is None:
            raise ValueError(f"{path} is unreadable (a cut-short write or a corrupt file); delete it and run the "
                             "same prepare command again to redo that scan")
        recs.append(rec)
    return recs


def write_manifest(prepared: Path | str, cfg: Any) -> None:
    """(Re)write scans.csv, nodules.csv, skipped.csv, splits.json and fingerprint.json from the records."""
    import pandas as pd

    from lungsynth.runtime import write_json_atomic

    prepared = Path(prepared)
    recs = read_records(prepared)
    done = [r for r in recs if r["status"] == "done"]
    splits = patient_splits([r["scan"]["patient_id"] for r in done], cfg.data.split_fractions, cfg.data.split_seed,
                            strata=patient_strata(done))
    split_of = {p: s for s, ps in splits.items() for p in ps}
    scans = pd.DataFrame([{**r["scan"], "split": split_of[r["scan"]["patient_id"]]} for r in done])
    nods = pd.DataFrame([{**n, "split": split_of[n["patient_id"]]} for r in done for n in r["nodules"]])
    skipped = [s for r in done for s in r.get("skipped", [])]
    skipped += [{"scan_id": r["scan"]["scan_id"], "what": "scan", "reason": r["reason"]}
                for r in recs if r["status"] == "skipped"]
    if scans.empty:
        scans = pd.DataFrame(columns=SCAN_COLUMNS)
    if nods.empty:
        nods = pd.DataFrame(columns=NODULE_COLUMNS)
    scans = scans.reindex(columns=list(SCAN_COLUMNS) + [c for c in scans.columns if c not in SCAN_COLUMNS])  # real
    # LIDC scans have no healthy twin: the column is then empty
    nods = nods[list(NODULE_COLUMNS) + [c for c in nods.columns if c not in NODULE_COLUMNS]]
    for name, df in (("scans.csv", scans), ("nodules.csv", nods),
                     ("skipped.csv", pd.DataFrame(skipped, columns=["scan_id", "what", "reason"]))):
        tmp = prepared / f".tmp_{name}"
        df.to_csv(tmp, index=False)
        tmp.replace(prepared / name)
    write_json_atomic(prepared / "splits.json", splits)
    write_json_atomic(prepared / "manifest.json", split_settings(cfg))
    fingerprint.write(prepared, fingerprint.compute(done, splits, split_settings(cfg)))


def split_settings(cfg: Any) -> dict[str, Any]:
    """What the splits depend on besides the records (kept in manifest.json to notice changes)."""
    return {"split_fractions": [float(f) for f in cfg.data.split_fractions], "split_seed": int(cfg.data.split_seed)}


def manifest_current(prepared: Path | str, cfg: Any) -> bool:
    """True when manifest.json says the splits were cut with ``cfg``'s split settings and the folder has
    its fingerprint (a folder from before fingerprints gets its manifest rewritten)."""
    path = Path(prepared) / "manifest.json"
    if not (path.is_file() and json.loads(path.read_text()) == split_settings(cfg)):
        return False
    return fingerprint.read(prepared) is not None


