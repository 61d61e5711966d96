"""Chapter 10-11 metrics against hand-computed cases."""

import math

import numpy as np
import pandas as pd
import pytest

from lungsynth.downstream import metrics as M


def test_dice_sensitivity_specificity_by_hand():
    # 10 voxels: target {0,1,2,3}, prediction {2,3,4}: TP 2, FP 1, FN 2, TN 5
    t = np.zeros(10, bool)
    t[:4] = True
    p = np.zeros(10, bool)
    p[2:5] = True
    assert M.confusion(p, t) == {"tp": 2, "fp": 1, "tn": 5, "fn": 2}
    assert M.dice(p, t) == pytest.approx(4 / 7)
    assert M.sensitivity(p, t) == pytest.approx(2 / 4)
    assert M.specificity(p, t) == pytest.approx(5 / 6)
    assert M.segmentation_metrics(p.reshape(2, 5), t.reshape(2, 5)) == pytest.approx(
        {"dice": 4 / 7, "sensitivity": 0.5, "specificity": 5 / 6})


def test_empty_cases():
    z = np.zeros((3, 3, 3))
    assert M.dice(z, z) == 1.0
    assert math.isnan(M.sensitivity(z, z))
    assert M.specificity(z, z) == 1.0
    assert math.isnan(M.specificity(np.ones(4), np.ones(4)))
    with pytest.raises(ValueError, match="same shape"):
        M.dice(np.zeros(3), np.zeros(4))


def test_auroc_auprc_one_vs_rest_by_hand():
    # class 1 vs rest: scores 0.8 (pos), 0.4 (neg), 0.35 (pos), 0.1 (neg)
    # AUROC: pairs (pos > neg): 0.8>0.4, 0.8>0.1, 0.35>0.1, 0.35<0.4 -> 3/4
    # AP: recall steps 1/2 at precision 1, 1/2 at precision 2/3 -> 5/6
    y = [0, 0, 1, 1]
    s1 = np.array([0.1, 0.4, 0.35, 0.8])
    proba = np.stack([1 - s1, s1], 1)
    rows = M.one_vs_rest(y, proba, names={0: "a", 1: "b"})
    assert rows[1]["class"] == "b" and rows[1]["n_pos"] == 2
    assert rows[1]["auroc"] == pytest.approx(0.75)
    assert rows[1]["auprc"] == pytest.approx(5 / 6)
    assert rows[0]["auroc"] == pytest.approx(0.75)  # the mirror image
    # a class absent from the labels: undefined, not a crash
    rows3 = M.one_vs_rest(y, np.c_[proba, np.zeros(4)])
    assert math.isnan(rows3[2]["auroc"]) and rows3[2]["n_pos"] == 0
    p, r = M.pr_curve(y, proba, 1)
    assert r[0] == 1.0 and p[-1] == 1.0


def test_mann_whitney_by_hand():
    # complete separation of 3 vs 3: U = 0, exact two-sided p = 2 / C(6,3) = 0.1
    assert M.mann_whitney_p([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1)
    assert M.mann_whitney_p([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
    assert M.mann_whitney_p([0.5, 0.5], [0.5, 0.5]) == 1.0
    assert math.isnan(M.mann_whitney_p([], [1.0]))
    assert M.mann_whitney_p([1, float("nan"), 2, 3], [4, 5, 6]) == pytest.approx(0.1)


def test_size_bins_and_aggregate():
    assert [M.size_bin(d) for d in (5.9, 6, 9.99, 10, 19.9, 20, 29.9, 30)] == \
        [None, "6-10", "6-10", "10-20", "10-20", "20-30", "20-30", None]
    runs = pd.DataFrame({"ratio": [0, 0, 0.5, 0.5, 0.5], "dice": [0.2, 0.4, 0.5, 0.7, float("nan")]})
    t = M.aggregate(runs, ["ratio"], ["dice"])
    assert t["dice_mean"].tolist() == pytest.approx([0.3, 0.6])
    assert t["dice_std"].tolist() == pytest.approx([np.std([0.2, 0.4], ddof=1), np.std([0.5, 0.7], ddof=1)])
    assert t["dice_n"].tolist() == [2, 2]
    assert M.mean_pm_std(t, ["dice"])["dice"].tolist() == ["0.300 ± 0.141", "0.600 ± 0.141"]
    with pytest.raises(ValueError, match="not in the rows"):
        M.aggregate(runs, ["seed"], ["dice"])
