"""Tiny fakes for chapters 08-09 tests: a prepared-format real dataset and method adapters.

``make_fake_prepared(root)`` writes scans.csv / nodules.csv / splits.json / volumes/*.nii.gz and the
slice views of a few 16^3 scans (train and test splits) in seconds, so the tests need no phantom.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from lungsynth.methods.base import MethodFace

ATTRS = {"sphericity": 4, "margin": 4, "lobulation": 2, "spiculation": 1, "texture": 5, "calcification": 6,
         "internal_structure": 1, "subtlety": 4, "malignancy": 3}


def _ball(shape, centre, r):
    grid = np.indices(shape).astype(np.float32)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= r * r


def make_fake_prepared(root: Path, n_train: int = 8, n_test: int = 6, size: int = 16, seed: int = 0,
                       n_val: int = 0) -> Path:
    """Patients FAKE-000.. of the train split, then the test split, then ``n_val`` of the val split."""
    from lungsynth.data.preprocess import save_nifti, save_npz

    rng = np.random.default_rng(seed)
    root = Path(root)
    scans, nods = [], []
    splits = {"train": [], "val": [], "test": []}
    aff = np.diag([4.0, 4.0, 4.0, 1.0])
    for i in range(n_train + n_test + n_val):
        split = "train" if i < n_train else "test" if i < n_train + n_test else "val"
        sid = f"FAKE-{i:03d}_s{i}"
        splits[split].append(f"FAKE-{i:03d}")
        shape = (size,) * 3
        lung = _ball(shape, (size / 2,) * 3, size * 0.4)
        c = rng.integers(size // 2 - 3, size // 2 + 3, 3)
        nod = _ball(shape, c, 1.5 + rng.random())
        ct = np.where(lung, -800.0, 40.0) + rng.normal(0, 30, shape)
        ct[nod] = rng.normal(0, 30, int(nod.sum()))
        label = nod.astype(np.uint8)
        cond = (np.where(lung | nod, 0.5, 0.0) + nod * 4.5).astype(np.float32) / 5.0
        hr = np.stack([nod, nod, np.zeros_like(nod)], -1).astype(np.uint8)
        files = {k: f"volumes/{sid}_{k}.nii.gz" for k in ("ct", "lung", "label", "cond", "hrmask")}
        for k, arr in (("ct", ct.astype(np.float32)), ("lung", (lung | nod).astype(np.uint8)), ("label", label),
                       ("cond", cond), ("hrmask", hr)):
            save_nifti(root / files[k], arr, aff)
        scans.append({"scan_id": sid, "patient_id": f"FAKE-{i:03d}", "split": split, **files, "spacing_mm": 4.0,
                      "shape": f"{size},{size},{size}", "n_nodules": 1, "source": "fake"})
        nid = f"{sid}_n0"
        k = int(c[0])
        box = np.zeros((size, size), np.uint8)
        box[c[1] - 2:c[1] + 3, c[2] - 2:c[2] + 3] = 1
        save_npz(root / "views" / "slices" / f"{nid}.npz", image=ct[k].astype(np.float32), box=box,
                 lung=lung[k].astype(np.uint8), mask=nod[k].astype(np.uint8), spacing_mm=np.float32(4.0))
        nods.append({"nodule_id": nid, "scan_id": sid, "patient_id": f"FAKE-{i:03d}", "split": split,
                     "label_value": 1, "centroid_vox_x": float(c[2]), "centroid_vox_y": float(c[1]),
                     "centroid_vox_z": float(c[0]), "diameter_mm": 12.0, "volume_mm3": 900.0, "subtype": "solid",
                     "subtype_id": 0, **ATTRS, "reader_scores": json.dumps([{a: ATTRS[a] for a in ATTRS}]),
                     "spacing_2d_mm": 4.0})
    pd.DataFrame(scans).to_csv(root / "scans.csv", index=False)
    pd.DataFrame(nods).to_csv(root / "nodules.csv", index=False)
    (root / "splits.json").write_text(json.dumps(splits))
    from lungsynth.data import fingerprint

    fingerprint.write(root, fingerprint.compute([{"scan": s} for s in scans], splits, {"fake_seed": seed}))
    return root


def stamp_generator(run_dir: Path, root: Path, trained_on=("train",), extra_patients=()) -> Path:
    """Mark ``run_dir`` as a generator trained on the ``trained_on`` patients of ``root`` (its data stamp)."""
    from lungsynth.data import fingerprint

    fingerprint.write_stamp(run_dir, fingerprint.stamp(root, trained_on, extra_patients))
    return Path(run_dir)


class NoisyCopy(MethodFace):
    """A 'method' that returns the condition's real image plus seeded noise (volume or slice unit).

    ``fail_after``: raise after that many generate() calls (simulates a killed run).
    """

    module = "numpy"

    def __init__(self, unit: str = "volume", noise_hu: float = 20.0, fail_after: int | None = None,
                 name: str = "noisycopy") -> None:
        super().__init__(noise_hu=noise_hu)
        self.unit, self.name, self.fail_after, self.calls = unit, name, fail_after, 0

    def load(self, cfg, run_dir):
        return "model"

    def generate(self, cfg, model, conditions, seed):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        rng = np.random.default_rng(seed)
        key = "ct" if self.unit == "volume" else "image"
        return [{"arrays": {key: c.arrays[key] + rng.normal(0, self.options["noise_hu"], c.arrays[key].shape)}}
                for c in conditions]


class NaNMethod(NoisyCopy):
    def generate(self, cfg, model, conditions, seed):
        out = super().generate(cfg, model, conditions, seed)
        out[0]["arrays"]["ct"][0, 0, 0] = np.nan
        return out
