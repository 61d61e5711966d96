"""Nodules of a label map: which are big enough to judge, and their diameters."""

from __future__ import annotations

import numpy as np
import pytest

from lungsynth.eval.nodules import label_nodules, sphere_diameter_mm


def test_label_nodules_keeps_connected_nodules_of_at_least_min_mm():
    label = np.zeros((20, 20, 20), np.float32)
    label[2:5, 2:5, 2:5] = 1  # 27 voxels at 2 mm: a 7.4 mm sphere
    label[12, 12, 12:14] = 1  # 2 voxels: 2.5 mm
    found = label_nodules(label, 2.0)
    assert len(found) == 1 and found[0]["mask"].sum() == 27
    assert found[0]["diameter_mm"] == pytest.approx(sphere_diameter_mm(27, 2.0)) == pytest.approx(7.45, abs=0.01)
    assert len(label_nodules(label, 2.0, min_mm=2.0)) == 2
    assert label_nodules(np.zeros((4, 4, 4)), 2.0) == []
