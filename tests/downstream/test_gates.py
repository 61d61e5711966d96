"""Chapters 10-11's gates read the real-only baselines the chapters wrote, judge them against fixed thresholds,
and treat a result made from other data as missing."""

from __future__ import annotations

import pandas as pd
import pytest

from lungsynth.data import fingerprint
from lungsynth.downstream.common import save_result
from lungsynth.downstream.gates import MIN_MACRO_AUROC, classification_gates, segmentation_gates


def _seg_result(cfg, folder, real_root, real_dice: float, n_items: int = 24, n_empty: int = 0):
    runs = pd.DataFrame([{"setting": "crop", "ratio": r, "seed": s, "dice": d}
                         for s in (0, 1) for r, d in ((0.0, real_dice), (1.0, 0.9))])
    items = pd.DataFrame([{"setting": "crop", "ratio": 0.0, "seed": s, "item_id": f"n{i}", "dice": real_dice,
                           "empty_target": i < n_empty} for s in (0, 1) for i in range(n_items)])
    save_result(cfg, folder, "test", {"seg_runs": runs, "seg_items": items}, real_root=real_root)


def test_segmentation_gate_judges_the_real_only_crop_dice(cfg, real_root, tmp_path):
    folder = tmp_path / "seg"
    assert segmentation_gates(cfg, folder, real_root)[0].status == "not trained"
    _seg_result(cfg, folder, real_root, 0.55)
    gate = segmentation_gates(cfg, folder, real_root)[0]
    assert (gate.status, gate.value, gate.n) == ("pass", 0.55, 24)  # ratio 1's 0.9 is not the baseline
    _seg_result(cfg, folder, real_root, 0.34)
    assert segmentation_gates(cfg, folder, real_root)[0].status == "fail"
    _seg_result(cfg, folder, real_root, 0.9, n_items=6)
    assert segmentation_gates(cfg, folder, real_root)[0].status == "insufficient N"
    _seg_result(cfg, folder, real_root, 0.9, n_items=24, n_empty=10)  # nodules with no voxel on the grid: no Dice
    gate = segmentation_gates(cfg, folder, real_root)[0]
    assert (gate.status, gate.n) == ("insufficient N", 14)


def _cls_result(cfg, folder, real_root, auroc: dict[int, float], n_pos_small: int = 2):
    rows = []
    for seed in (0, 1):
        for setting, shift in (("real", 0.0), ("balanced", 0.15)):
            for k, name in enumerate(("solid", "part-solid", "ground-glass")):
                rows.append({"setting": setting, "seed": seed, "size": "all", "class_id": k, "class": name,
                             "n_pos": 10, "n_neg": 20, "auroc": auroc[k] + shift})
                rows.append({"setting": setting, "seed": seed, "size": "20-30", "class_id": k, "class": name,
                             "n_pos": n_pos_small if k == 2 else 6, "n_neg": 8, "auroc": 0.5})
    save_result(cfg, folder, "test", {"subtype_runs": pd.DataFrame(rows)}, real_root=real_root)


def test_classification_gate_judges_the_real_only_macro_auroc_and_lists_small_strata(cfg, real_root, tmp_path):
    folder = tmp_path / "cls"
    _cls_result(cfg, folder, real_root, {0: 0.9, 1: 0.8, 2: 0.85})
    gate, strata = classification_gates(cfg, folder, real_root)
    assert gate.status == "pass" and abs(gate.value - 0.85) < 1e-9 and gate.n == 30
    assert strata.status == "info" and strata.value == 1 and "20-30 mm ground-glass (2)" in strata.detail
    _cls_result(cfg, folder, real_root, {0: 0.7, 1: 0.6, 2: 0.65})  # balanced would pass: not what is gated
    gate = classification_gates(cfg, folder, real_root)[0]
    assert gate.status == "fail" and gate.value < MIN_MACRO_AUROC


def test_a_result_from_other_data_counts_as_missing(cfg, real_root, tmp_path):
    folder = tmp_path / "cls"
    _cls_result(cfg, folder, real_root, {0: 0.9, 1: 0.9, 2: 0.9})
    stamp = fingerprint.read_stamp(folder)
    fingerprint.write_stamp(folder, {**stamp, "id": "another-dataset"})
    gate = classification_gates(cfg, folder, real_root)[0]
    assert gate.status == "not trained" and "other data" in gate.detail and "`lungsynth downstream cls" in gate.detail


def test_the_crop_dice_by_size_says_where_a_mean_comes_from_and_which_strata_are_too_small(tmp_path):
    from lungsynth.downstream.gates import dice_by_size

    sizes = {"a": 4.0, "b": 7.0, "c": 8.0, "d": 9.0, "e": 9.5, "f": 9.9, "g": 25.0}
    pd.DataFrame({"nodule_id": list(sizes), "diameter_mm": list(sizes.values())}).to_csv(tmp_path / "nodules.csv")
    dice = {"a": 0.0, "b": 0.2, "c": 0.2, "d": 0.2, "e": 0.2, "f": 0.2, "g": 0.8}
    items = pd.DataFrame([{"seed": s, "item_id": k, "dice": d} for s in (0, 1) for k, d in dice.items()])
    row = dice_by_size(items, tmp_path)
    assert row.status == "info" and row.n == 7
    assert row.value == pytest.approx((5 * 0.2 + 0.8) / 6)  # 6-30 mm only: the 4 mm nodule is not in it
    assert "<6 mm: 0.00 (1, too few)" in row.detail and "6-10 mm: 0.20 (5)" in row.detail
    assert "20-30 mm: 0.80 (1, too few)" in row.detail and ">30 mm: - (0, too few)" in row.detail
