"""Chapter 01's gates on a small prepared phantom: values computed by hand from its tables."""

import numpy as np
import pandas as pd
import pytest

from lungsynth.data import gates as G


def test_visibility_per_view_by_hand(prepared, small_cfg):
    P, _ = prepared
    nod = pd.read_csv(P / "nodules.csv")
    rows = {g.name: g for g in G.quality_gates(small_cfg, P) if "visible" in g.name}
    assert len(rows) == 5
    big = nod.loc[nod["diameter_mm"] >= 6]
    d = big["diameter_mm"].to_numpy(float)
    fov = small_cfg.data.spacing_3d_mm * small_cfg.data.size_3d
    scans = pd.read_csv(P / "scans.csv").set_index("scan_id")
    # the whole slice: the scan's 512-pixel field of view over size_2d pixels
    slice_mm = 512 * scans.loc[big["scan_id"], "pixel_spacing_mm"].to_numpy(float) / small_cfg.data.size_2d
    assert big["spacing_2d_mm"].to_numpy(float) == pytest.approx(slice_mm, rel=1e-3)
    expect = {"3D volume": d.min() / small_cfg.data.spacing_3d_mm, "Lung-DDPM": d.min() / (fov / small_cfg.data.size_ddpm),
              "2D slice": (d / slice_mm).min(), "1 mm crop": d.min(),
              "ROI": small_cfg.data.roi_size / 2.0}
    for key, value in expect.items():
        (gate,) = [g for name, g in rows.items() if key in name]
        assert gate.value == pytest.approx(value) and gate.n == len(d)
        assert gate.status == ("pass" if value >= 2 else "fail")
    # at 6 mm the smallest >= 6 mm nodule is about a voxel across: the smoke-sized 3D view fails, as it should
    assert rows[[n for n in rows if "3D volume" in n][0]].status == "fail"


def test_in_lung_fraction_is_voxel_weighted(prepared, small_cfg):
    P, _ = prepared
    scans = pd.read_csv(P / "scans.csv")
    (gate,) = [g for g in G.quality_gates(small_cfg, P) if "inside the lung" in g.name]
    v, f = scans["nodule_voxels"].to_numpy(float), scans["nodule_in_lung_fraction"].to_numpy(float)
    assert gate.value == pytest.approx((v * f).sum() / v.sum())
    tampered = scans.assign(nodule_in_lung_fraction=[0.5] + [1.0] * (len(scans) - 1),
                            nodule_voxels=[1000] + [1] * (len(scans) - 1))
    assert G.in_lung_gate(tampered).status == "fail"


def test_unprepared_folder_is_listed_with_its_command(tmp_path, small_cfg):
    (row,) = G.quality_gates(small_cfg, tmp_path)
    assert row.status == "not trained" and "lungsynth data default" in row.detail
