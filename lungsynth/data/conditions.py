"""Where the conditions of a synthetic dataset come from.

A :class:`Condition` is everything one sample is generated from, plus where it came from (the real scan
or nodule whose masks were used), so every synthetic sample can be traced to its condition.

Units (the natural item of a method; the same views the prepared dataset has, notes/DATA_API.md):

- ``volume``: a whole prepared scan; arrays ``ct`` (HU, the real reference: inpainting / AAS methods use
  it), ``lung``, ``label``, ``cond`` [D, H, W] and ``hrmask`` [D, H, W, 3] as saved, and on phantom data
  ``healthy`` [D, H, W] (HU, the same scan without its nodules: where inpainting methods place theirs);
- ``slice``: a nodule's centre slice (``views/slices``): ``image`` (HU), ``box``, ``lung``, ``mask`` [H, W];
- ``roi``: a nodule ROI (``views/rois``): ``image`` (HU) [R, R];
- ``crop``: a nodule-centred 3D crop (``views/crops``): ``ct`` (HU), ``mask`` [C, C, C], ``hrmask`` [3, C, C, C].

``heldout`` conditions cycle through the real test split in table order (sample i uses row i mod n);
``sampler`` conditions draw real training masks at random (a method adapter may replace this with its
own condition sampler, e.g. chapter 04's anatomical box sampler); ``validation`` conditions draw the
validation split's masks at random: patients neither a generator nor a downstream model trains on, nor any
test patient (Lung-DDPM's "validation cohort", its Table I; chapter 10's synthetic volumes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

UNITS: tuple[str, ...] = ("volume", "slice", "roi", "crop")
SOURCES: tuple[str, ...] = ("heldout", "sampler", "validation")
SOURCE_SPLITS = {"heldout": "test", "sampler": "train", "validation": "val"}  # the split each source draws
VIEW_DIRS = {"slice": "slices", "roi": "rois", "crop": "crops"}


@dataclass
class Condition:
    """One sample's condition. ``nodules`` holds the real nodule rows (dicts of nodules.csv) it carries."""

    index: int
    source: str
    unit: str
    scan_id: str | None = None
    nodule_id: str | None = None
    split: str | None = None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    nodules: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def provenance(self) -> dict[str, Any]:
        """What to store with the sample: source, real scan/nodule ids and split, plus ``extra``."""
        out = {"condition_source": self.source, "condition_scan_id": self.scan_id,
               "condition_nodule_id": self.nodule_id, "condition_split": self.split}
        out.update({f"condition_{k}": v for k, v in self.extra.items()})
        return out


def _check_unit(unit: str) -> None:
    if unit not in UNITS:
        raise ValueError(f"unknown sample unit {unit!r}; use one of {', '.join(UNITS)}")


def real_root(cfg: Any, root: Path | str | None = None) -> Path:
    """The real prepared dataset: ``root`` when given, else the profile's (prepared when missing)."""
    if root is not None:
        root = Path(root)
        if not (root / "scans.csv").is_file():
            raise FileNotFoundError(f"{root / 'scans.csv'} not found; point root at a prepared dataset folder")
        return root
    from lungsynth.data.datasets import ensure_prepared

    return ensure_prepared(cfg, verbose=False)


def view_rows(root: Path, unit: str, split: str) -> list[dict[str, Any]]:
    from lungsynth.data.datasets import load_nodules, load_scans

    table = load_scans(root) if unit == "volume" else load_nodules(root)
    if split != "all":
        table = table[table["split"] == split]
    return table.reset_index(drop=True).to_dict("records")


def load_arrays(root: Path, unit: str, row: dict[str, Any]) -> dict[str, np.ndarray]:
    """The raw arrays (HU and masks, as saved) of one scan row (``volume``) or nodule row (other units)."""
    from lungsynth.data.datasets import load_volume

    if unit == "volume":
        return {k: np.asarray(load_volume(root, row[k])) for k in ("ct", "lung", "label", "cond", "hrmask", "healthy")
                if isinstance(row.get(k), str)}
    path = root / "views" / VIEW_DIRS[unit] / f"{row['nodule_id']}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; the {unit} view of nodule {row['nodule_id']} is missing "
                                f"(re-run `lungsynth data default` to rebuild the views)")
    with np.load(path) as z:
        return {k: np.asarray(z[k]) for k in z.files}


def _nodules_of(root: Path, scan_id: str) -> list[dict[str, Any]]:
    from lungsynth.data.datasets import load_nodules

    nod = load_nodules(root)
    return nod[nod["scan_id"] == scan_id].to_dict("records")


def real_conditions(cfg: Any, unit: str, n: int, *, source: str = "heldout", seed: int = 0,
                    root: Path | str | None = None, split: str | None = None) -> list[Condition]:
    """``n`` conditions from real data: ``heldout`` cycles the test split, ``sampler`` draws the train split at
    random, ``validation`` the val split.

    Args:
        unit: ``volume`` | ``slice`` | ``roi`` | ``crop``.
        split: overrides the split (default :data:`SOURCE_SPLITS` of ``source``).
    Returns:
        n :class:`Condition` with arrays loaded lazily into memory (n rows; repeated rows share arrays).
    """
    _check_unit(unit)
    if source not in SOURCES:
        raise ValueError(f"unknown condition source {source!r}; use one of {', '.join(SOURCES)}")
    if int(n) < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    root = real_root(cfg, root)
    split = split or SOURCE_SPLITS[source]
    rows = view_rows(root, unit, split)
    if not rows:
        raise ValueError(f"the {split!r} split of {root} holds no {unit} items; prepare more scans "
                         f"(cfg.data.n_scans) or use another split")
    if source == "heldout":
        order = [i % len(rows) for i in range(int(n))]
    else:
        order = np.random.default_rng(seed).integers(0, len(rows), int(n)).tolist()
    cache: dict[int, tuple[dict[str, np.ndarray], list[dict[str, Any]]]] = {}
    out = []
    for i, r in enumerate(order):
        row = rows[r]
        if r not in cache:
            nods = _nodules_of(root, row["scan_id"]) if unit == "volume" else [row]
            cache[r] = (load_arrays(root, unit, row), nods)
        arrays, nods = cache[r]
        out.append(Condition(index=i, source=source, unit=unit, scan_id=str(row["scan_id"]),
                             nodule_id=None if unit == "volume" else str(row["nodule_id"]), split=split,
                             arrays=arrays, nodules=[dict(x) for x in nods]))
    return out


def reader_scores_of(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-reader scores of a nodule row (JSON in nodules.csv) as a list of dicts."""
    value = row.get("reader_scores")
    if isinstance(value, str) and value:
        return json.loads(value)
    return list(value) if isinstance(value, list) else []
