import json

import pytest
import torch

from lungsynth.data.datasets import CropDataset, RoiDataset, SliceDataset, VolumeDataset


def test_volume_dataset(prepared, small_cfg):
    P, _ = prepared
    ds = VolumeDataset(small_cfg, "all", root=P, keys=("ct", "lung", "label", "cond", "hrmask"))
    assert len(ds) == 2
    it = ds[0]
    S = small_cfg.data.size_3d
    assert it["ct"].shape == (1, S, S, S) and it["hrmask"].shape == (3, S, S, S)
    assert 0 <= float(it["ct"].min()) and float(it["ct"].max()) <= 1
    assert float(it["cond"].max()) <= 1 and int(it["label"].max()) >= 1
    small = VolumeDataset(small_cfg, "all", size=16, root=P)[0]
    assert small["ct"].shape == (1, 16, 16, 16) and int(small["label"].max()) == int(it["label"].max())


def test_slice_roi_crop_datasets(prepared, small_cfg):
    P, _ = prepared
    d = small_cfg.data
    sl = SliceDataset(small_cfg, "all", root=P)
    it = sl[0]
    assert it["image"].shape == (1, d.size_2d, d.size_2d) and it["box"].sum() >= 1
    assert it["attributes"].dtype == torch.long and it["attributes"].shape == (5,)
    assert ((it["attributes"] >= 1) & (it["attributes"] <= 5)).all()
    assert (it["mask"] <= it["box"]).all()  # the square box covers the nodule
    roi = RoiDataset(small_cfg, "all", root=P)[0]
    assert roi["image"].shape == (1, d.roi_size, d.roi_size) and "nodule" in roi["prompt"]
    cr = CropDataset(small_cfg, "all", root=P)
    c = cr[0]
    C = d.crop_size
    assert c["ct"].shape == (1, C, C, C) and c["hrmask"].shape == (3, C, C, C)
    assert c["mask"][0, C // 2 - 2:C // 2 + 3, C // 2 - 2:C // 2 + 3, C // 2 - 2:C // 2 + 3].sum() > 0
    assert torch.equal(c["hrmask"][0], c["mask"][0])
    assert (c["hrmask"][1] + c["hrmask"][2] == c["hrmask"][0]).all()
    assert c["subtype_id"] in (0, 1, 2) and cr.table.split.isin(["train", "val", "test"]).all()


def test_ensure_prepared_recuts_splits_and_redoes_stale_records(tmp_path, monkeypatch, capsys):
    import json

    from lungsynth.data import fingerprint

    from lungsynth.config import get_config
    from lungsynth.data import datasets
    from lungsynth.data.preprocess import PREPARE_VERSION

    monkeypatch.setenv("LUNGSYNTH_HOME", str(tmp_path))
    monkeypatch.setattr(datasets, "_ENSURED", set())
    base = {"data.size_3d": 32, "data.spacing_3d_mm": 8.0, "data.size_2d": 32, "data.roi_size": 16,
            "data.crop_size": 16, "data.n_scans": 4, "data.phantom_render_matrix": 64}
    P = datasets.ensure_prepared(get_config("smoke", {**base, "data.split_fractions": (2, 1, 1)}), verbose=False)
    assert len(json.loads((P / "splits.json").read_text())["train"]) == 2
    records = sorted((P / "records").glob("*.json"))
    stamps = {r: r.stat().st_mtime_ns for r in records}

    # other voxel sizes (chapter 01's "Try this") are prepared into a folder of their own, P is left as it was
    other = datasets.ensure_prepared(get_config("smoke", {**base, "data.spacing_3d_mm": 10.0}), verbose=False)
    assert other.parent == P.parent and other != P and (other / "scans.csv").is_file()
    assert {r: r.stat().st_mtime_ns for r in records} == stamps
    first = fingerprint.load(P)
    assert first["source"] == "phantom" and first["splits"] == json.loads((P / "splits.json").read_text())

    # other split settings: the splits are cut again, no scan is prepared again, the fingerprint changes
    datasets.ensure_prepared(get_config("smoke", {**base, "data.split_fractions": (1, 1, 2)}), verbose=False)
    splits = json.loads((P / "splits.json").read_text())
    assert [len(splits[k]) for k in ("train", "val", "test")] == [1, 1, 2]
    assert {r: r.stat().st_mtime_ns for r in records} == stamps
    second = fingerprint.load(P)
    assert second["id"] != first["id"] and second["splits"] == splits

    # a folder prepared before fingerprints gets its manifest rewritten, with a message, nothing redone
    (P / fingerprint.FILENAME).unlink()
    monkeypatch.setattr(datasets, "_ENSURED", set())
    datasets.ensure_prepared(get_config("smoke", {**base, "data.split_fractions": (1, 1, 2)}), verbose=False)
    assert fingerprint.load(P)["id"] == second["id"]
    assert "prepared before data fingerprints" in capsys.readouterr().out
    assert {r: r.stat().st_mtime_ns for r in records} == stamps

    # a record written by an older preparation is prepared again
    rec = json.loads(records[0].read_text())
    assert rec["config"]["version"] == PREPARE_VERSION
    rec["config"]["version"] = PREPARE_VERSION - 1
    records[0].write_text(json.dumps(rec))
    monkeypatch.setattr(datasets, "_ENSURED", set())
    datasets.ensure_prepared(get_config("smoke", {**base, "data.split_fractions": (1, 1, 2)}), verbose=False)
    assert json.loads(records[0].read_text())["config"]["version"] == PREPARE_VERSION
    assert all(r.stat().st_mtime_ns == stamps[r] for r in records[1:])

    # a record cut short (or corrupt) is detected and that scan alone is prepared again
    records[2].write_text('{"status": "do')
    monkeypatch.setattr(datasets, "_ENSURED", set())
    datasets.ensure_prepared(get_config("smoke", {**base, "data.split_fractions": (1, 1, 2)}), verbose=False)
    assert json.loads(records[2].read_text())["status"] == "done"
    assert all(records[i].stat().st_mtime_ns == stamps[records[i]] for i in (1, 3))

    # a folder prepared from real DICOM never gets phantom scans: a missing/stale scan is an error
    import pandas as pd

    scans = pd.read_csv(P / "scans.csv")
    scans["source"] = "dicom"
    scans.to_csv(P / "scans.csv", index=False)
    rec = json.loads(records[1].read_text())
    rec["config"]["version"] = PREPARE_VERSION - 1
    records[1].write_text(json.dumps(rec))
    stale = records[1].stat().st_mtime_ns
    monkeypatch.setattr(datasets, "_ENSURED", set())
    with pytest.raises(ValueError, match=r"prepared from LIDC-IDRI DICOM.*never added.*--scans \d+") as err:
        datasets.ensure_prepared(get_config("smoke", {**base, "data.split_fractions": (1, 1, 2)}), verbose=False)
    assert str(P) in str(err.value)
    assert records[1].stat().st_mtime_ns == stale  # nothing was written into the real dataset


def test_two_processes_preparing_at_once_leave_one_dataset(tmp_path):
    """`lungsynth data default` twice at the same moment: one prepares, the other waits and reuses it."""
    import os
    import subprocess
    import sys

    import pandas as pd

    env = {**os.environ, "LUNGSYNTH_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lungsynth", "data", "default", "--profile", "smoke"]
    for key, value in {"data.n_scans": 2, "data.size_3d": 32, "data.spacing_3d_mm": 8.0, "data.size_2d": 32,
                       "data.roi_size": 16, "data.crop_size": 16, "data.phantom_render_matrix": 64}.items():
        cmd += ["--set", f"{key}={value}"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    # exactly one process rendered and prepared; the other waited on the lock and reused its output
    assert sorted(out.count("prepare LIDC-IDRI") for out in outs) == [0, 2], outs
    # the overridden settings were prepared beside the profile's folder, which nobody touched
    (P,) = [p for p in (tmp_path / "data" / "generated" / "smoke").glob("prepared@*") if p.is_dir()]
    assert not (P.parent / "prepared").exists()
    scans = pd.read_csv(P / "scans.csv")
    assert len(scans) == 2 and scans["scan_id"].is_unique
    assert len(list((P / "records").glob("*.json"))) == 2
    run = json.loads((P / "prepare_run.json").read_text())
    assert run["status"] == "ok" and len(run["results"]["scans"]) == 2


def test_prepared_folder_is_the_profiles_unless_preparation_settings_differ(monkeypatch, tmp_path):
    from lungsynth import paths
    from lungsynth.config import get_config
    from lungsynth.data.datasets import prepared_folder

    monkeypatch.setenv("LUNGSYNTH_HOME", str(tmp_path))
    shared = paths.prepared_dir("smoke")
    assert prepared_folder(get_config("smoke")) == shared
    # the scan count, splits, windows and training settings do not make another dataset
    assert prepared_folder(get_config("smoke", {"data.n_scans": 4, "data.split_seed": 3, "data.hu_max": 600.0,
                                                "land.train_steps": 3})) == shared
    assert prepared_folder(get_config("smoke", {"data.spacing_3d_mm": 3.0})) == \
        shared.with_name("prepared@spacing_3d_mm=3.0")
    assert prepared_folder(get_config("smoke", {"data.n_scans": 4, "data.crop_size": 16, "data.size_3d": 32})) == \
        shared.with_name("prepared@crop_size=16+size_3d=32")


def test_data_overrides_never_prepare_phantom_beside_a_real_dataset(monkeypatch, tmp_path):
    import pandas as pd

    from lungsynth import paths
    from lungsynth.config import get_config
    from lungsynth.data import datasets

    monkeypatch.setenv("LUNGSYNTH_HOME", str(tmp_path))
    monkeypatch.setattr(datasets, "_ENSURED", set())
    shared = paths.prepared_dir("smoke")
    shared.mkdir(parents=True)
    pd.DataFrame({"scan_id": ["LIDC-IDRI-0078"], "source": ["dicom"]}).to_csv(shared / "scans.csv", index=False)
    with pytest.raises(ValueError, match=r"LIDC-IDRI DICOM.*--set data.spacing_3d_mm=3.0") as err:
        datasets.ensure_prepared(get_config("smoke", {"data.spacing_3d_mm": 3.0}), verbose=False)
    assert "lungsynth data prepare --dicom-root ROOT --out" in str(err.value)
    assert not datasets.prepared_folder(get_config("smoke", {"data.spacing_3d_mm": 3.0})).exists()
