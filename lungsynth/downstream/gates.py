"""Chapters 10-11's quality gates: real-only baselines strong enough that a difference could be detected.

Whether synthetic data helps is reported as measured (with p-values), never gated. What is gated is the
experiment's power to answer: a real-only model at chance cannot be helped or hurt measurably.

- chapter 10: the real-only crop segmenter's Dice on the held-out test patients, mean over seeds >= 0.5; beside it
  the same Dice by nodule diameter, and which strata are too small;
- chapter 11: the real-only subtype classifier's macro AUROC on the held-out test nodules, mean over seeds
  >= 0.8; beside it, which (size, subtype) strata hold too few test nodules to report an AUROC.

The gates read what the chapters (or ``lungsynth downstream seg|cls``) wrote under ``runs/<profile>/``; they
never train. A result made from other prepared data than the profile's counts as missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lungsynth.gates import Gate, info, judge, not_trained

SEG_RUN, CLS_RUN = "10_downstream_seg", "11_downstream_cls"
# Issue 23: a real-only crop segmenter at Dice 0.5 delineates most of each nodule, so synthetic crops that help
# or hurt move it visibly; Lung-DDPM's own real-only crop Dice is of that order.
MIN_SEG_DICE = 0.5
# Issue 23: HR-LDM's real-only subtype classifier reaches about 0.8 macro AUROC; below it the comparison with a
# balanced set measures noise around chance.
MIN_MACRO_AUROC = 0.8
# Fewer positives than this in a stratum and one nodule moves its AUROC by more than 0.1 (1 / (n_pos x n_neg)
# steps at best): the stratum is listed as too small to report.
MIN_STRATUM_POSITIVES = 5
# Test items below which a mean Dice or AUROC is a demonstration, not a baseline (smoke scores about ten).
MIN_TEST_ITEMS = 20


def _results(folder: Path, root: Path, table: str, chapter: str, name: str, command: str) -> tuple[Any, Gate | None]:
    """``folder``'s ``table`` CSV, or the "not trained" row naming ``command`` when it is missing or was made from
    other prepared data than ``root``."""
    import pandas as pd

    from lungsynth.data import fingerprint

    missing = not_trained(chapter, name, command)
    if not (folder / f"{table}.csv").is_file():
        return None, missing
    had = fingerprint.read_stamp(folder)
    now = fingerprint.read(root)
    if had is None or now is None or had.get("id") != now.get("id"):
        missing.detail = f"{folder} was made from other data; run it again: `{command}`"
        return None, missing
    return pd.read_csv(folder / f"{table}.csv"), None


def _where(cfg: Any, run: str, folder: Path | str | None, root: Path | str | None) -> tuple[Path, Path]:
    from lungsynth import paths
    from lungsynth.data.datasets import prepared_folder

    return (Path(folder) if folder is not None else paths.run_dir(cfg.profile, run, create=False),
            Path(root) if root is not None else prepared_folder(cfg))


def segmentation_gates(cfg: Any, folder: Path | str | None = None, root: Path | str | None = None) -> list[Gate]:
    """Chapter 10: the real-only (ratio 0) crop segmenter's mean Dice over seeds, from ``seg_runs.csv`` in
    ``folder`` (default ``runs/<profile>/10_downstream_seg``), made from the prepared ``root`` (default the
    profile's)."""
    name = "real-only crop segmenter: Dice on the test patients (mean over seeds)"
    command = f"lungsynth downstream seg --profile {cfg.profile} --setting crop"
    where = _where(cfg, SEG_RUN, folder, root)
    runs, missing = _results(*where, "seg_runs", "10", name, command)
    if missing is not None:
        return [missing]
    items = _results(*where, "seg_items", "10", name, command)[0]
    real = runs[(runs["setting"] == "crop") & (runs["ratio"] == 0.0)]
    scored = items[(items["setting"] == "crop") & (items["ratio"] == 0.0)] if items is not None else runs.iloc[:0]
    if "empty_target" in scored:  # a nodule with no voxel left on the crops' grid has no Dice
        scored = scored[~scored["empty_target"].astype(bool)]
    n_items = int((scored["seed"] == scored["seed"].min()).sum()) if len(scored) else 0
    dice = float(real["dice"].mean()) if len(real) else None
    gate = judge("10", name, dice, n=n_items, n_needed=MIN_TEST_ITEMS, at_least=MIN_SEG_DICE,
                 detail=f"{len(real)} seeds; whether synthetic crops help is in the chapter's table, not a gate")
    return [gate, dice_by_size(scored, where[1])]


# the size strata of chapter 10's crop Dice (mm): below the 6 mm every view keeps visible, then HR-LDM's three
SEG_SIZE_EDGES_MM = (0.0, 6.0, 10.0, 20.0, 30.0, float("inf"))


def dice_by_size(scored: Any, root: Path) -> Gate:
    """The real-only crop Dice by nodule diameter (``root``'s nodules.csv), mean over seeds and nodules, as an info
    row: where a low mean comes from, and which strata hold fewer than :data:`MIN_STRATUM_POSITIVES` nodules."""
    import pandas as pd

    name = "real-only crop segmenter: Dice by nodule diameter"
    sizes = pd.read_csv(Path(root) / "nodules.csv", usecols=["nodule_id", "diameter_mm"])
    rows = scored.merge(sizes, left_on="item_id", right_on="nodule_id", how="inner")
    edges = SEG_SIZE_EDGES_MM
    labels = [f"<{edges[1]:g}"] + [f"{a:g}-{b:g}" for a, b in zip(edges[1:-2], edges[2:-1])] + [f">{edges[-2]:g}"]
    rows["stratum"] = pd.cut(rows["diameter_mm"], list(edges), labels=labels, right=False)
    first = rows[rows["seed"] == rows["seed"].min()] if len(rows) else rows
    parts = []
    for label in labels:
        n = int((first["stratum"] == label).sum())
        mean = rows.loc[rows["stratum"] == label, "dice"].mean()
        few = ", too few" if n < MIN_STRATUM_POSITIVES else ""
        parts.append(f"{label} mm: " + (f"{mean:.2f}" if n else "-") + f" ({n}{few})")
    sized = rows[(rows["diameter_mm"] >= edges[1]) & (rows["diameter_mm"] < edges[-2])]
    return info("10", name, float(sized["dice"].mean()) if len(sized) else None, n=len(first),
                detail=f"value: the {edges[1]:g}-{edges[-2]:g} mm nodules; " + "; ".join(parts))


def classification_gates(cfg: Any, folder: Path | str | None = None, root: Path | str | None = None) -> list[Gate]:
    """Chapter 11: the real-only subtype classifier's macro AUROC (mean over seeds of the mean over the three
    subtypes, all sizes), and the (size, subtype) strata with fewer than :data:`MIN_STRATUM_POSITIVES` test
    nodules, from ``subtype_runs.csv`` in ``folder`` (default ``runs/<profile>/11_downstream_cls``)."""
    name = "real-only subtype classifier: macro AUROC on the test nodules (mean over seeds)"
    runs, missing = _results(*_where(cfg, CLS_RUN, folder, root), "subtype_runs", "11", name,
                             f"lungsynth downstream cls --profile {cfg.profile} --experiments subtype")
    if missing is not None:
        return [missing]
    real = runs[runs["setting"] == "real"]
    overall = real[real["size"] == "all"]
    macro = overall.groupby("seed")["auroc"].mean()
    n_test = int((overall["n_pos"] + overall["n_neg"]).iloc[0]) if len(overall) else 0
    gate = judge("11", name, float(macro.mean()) if len(macro) else None, n=n_test, n_needed=MIN_TEST_ITEMS,
                 at_least=MIN_MACRO_AUROC,
                 detail=f"{len(macro)} seeds; whether balancing helps is in the chapter's table, not a gate")
    first = real[real["seed"] == real["seed"].min()] if len(real) else real
    small = first[first["n_pos"] < MIN_STRATUM_POSITIVES]
    where = {"all": "all sizes"}
    listed = ", ".join(f"{where.get(r['size'], str(r['size']) + ' mm')} {r['class']} ({int(r['n_pos'])})"
                       for _, r in small.iterrows())
    strata = info("11", f"strata with < {MIN_STRATUM_POSITIVES} test nodules (too small to report)", len(small),
                  n=len(first), detail=listed or "every stratum has enough")
    return [gate, strata]
