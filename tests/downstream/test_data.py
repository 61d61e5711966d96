"""Item tables, crops cut from synthetic volumes, and the validation of synthetic datasets."""

import dataclasses
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from lungsynth.downstream.data import ItemDataset, cut_crop, real_items, synthetic_items, validate_synthetic


def test_item_tables_and_datasets(cfg, real_root, synthetic_train):
    vol = real_items(real_root, "volume", ("train",))
    assert len(vol) == 8 and not vol["synthetic"].any()
    syn = synthetic_items(synthetic_train, "nodule", real_root)
    assert syn["synthetic"].all() and syn["source"].eq("synthetic:noisycopy").all()
    assert syn["condition_split"].eq("train").all()
    table = pd.concat([real_items(real_root, "nodule"), syn], ignore_index=True)
    ds = ItemDataset(cfg, table, "crop", 16)
    item = ds[len(ds) - 1]
    assert item["image"].shape == (1, 16, 16, 16) and item["target"].shape == (1, 16, 16, 16)
    assert item["target"].sum() > 0  # the crop is centred on the nodule
    # a synthetic nodule has no crop view: the crop is cut from its volume and mapped through the config's HU
    # window, by hand here; a second, non-default window shows the window is the config's
    r = table.iloc[len(ds) - 1]
    ct_hu = np.asanyarray(nib.load(str(Path(r["root"]) / r["ct"])).dataobj).astype(np.float32)
    lab = np.asanyarray(nib.load(str(Path(r["root"]) / r["label"])).dataobj)
    crop, mask = cut_crop(ct_hu, lab, (r["centroid_vox_z"], r["centroid_vox_y"], r["centroid_vox_x"]),
                          float(r["spacing_mm"]), 16)
    assert np.array_equal(item["target"][0].numpy(), mask)
    other = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, hu_min=-1100.0, hu_max=200.0))
    for c, (lo, hi) in ((cfg, (cfg.data.hu_min, cfg.data.hu_max)), (other, (-1100.0, 200.0))):
        image = ItemDataset(c, table, "crop", 16)[len(ds) - 1]["image"][0].numpy()
        assert np.allclose(image, np.clip((crop - lo) / (hi - lo), 0.0, 1.0), atol=1e-6)
    assert ((crop > -1000) & (crop < 200)).mean() > 0.5  # most voxels lie inside both windows
    v = ItemDataset(cfg, vol, "volume", 8)[0]
    assert v["image"].shape == (1, 8, 8, 8) and v["target"].max() == 1


def test_wrong_format_is_an_error(tmp_path, real_root, synthetic_train):
    with pytest.raises(FileNotFoundError, match="not found"):
        validate_synthetic(tmp_path / "nope", "volume")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a synthetic dataset: synth.json is missing"):
        validate_synthetic(tmp_path / "empty", "volume")
    with pytest.raises(ValueError, match="not a synthetic dataset"):
        validate_synthetic(real_root, "nodule")  # a real prepared dataset is not synthetic
    d = tmp_path / "slice"
    shutil.copytree(synthetic_train, d)
    meta = json.loads((d / "synth.json").read_text())
    (d / "synth.json").write_text(json.dumps({**meta, "unit": "slice"}))
    with pytest.raises(ValueError, match="holds 'slice' samples"):
        validate_synthetic(d, "nodule")
    d2 = tmp_path / "noprov"
    shutil.copytree(synthetic_train, d2)
    (d2 / "provenance.csv").unlink()
    with pytest.raises(ValueError, match="provenance.csv is missing"):
        validate_synthetic(d2, "volume")


@pytest.mark.parametrize("column,value,match", [
    ("subtype_id", 5, r"unknown subtype_id values \['5'\]"),
    ("subtype", "calcified", "unknown or inconsistent subtype labels"),
    ("malignancy", 9, "outside the LIDC scale"),
])
def test_unknown_labels_are_an_error(tmp_path, real_root, synthetic_train, column, value, match):
    d = tmp_path / "bad"
    shutil.copytree(synthetic_train, d)
    nod = pd.read_csv(d / "nodules.csv")
    nod.loc[0, column] = value
    nod.to_csv(d / "nodules.csv", index=False)
    with pytest.raises(ValueError, match=match):
        synthetic_items(d, "nodule", real_root)


def test_condition_from_another_dataset_is_an_error(tmp_path, real_root, synthetic_train):
    d = tmp_path / "foreign"
    shutil.copytree(synthetic_train, d)
    prov = pd.read_csv(d / "provenance.csv")
    prov["condition_scan_id"] = "OTHER-001_s1"
    prov.to_csv(d / "provenance.csv", index=False)
    with pytest.raises(ValueError, match="not in the real dataset"):
        synthetic_items(d, "volume", real_root)


def test_patches_hit_the_nodule_every_other_draw(cfg, real_root):
    """Volume items cut into patches: image and target cut at the same place, about half the patches centred on
    a nodule voxel (far more than a uniform draw, whose patches rarely meet a nodule), reproducible by seed."""
    import torch

    from lungsynth.downstream.data import PatchDataset

    vols = ItemDataset(cfg, real_items(real_root, "volume"), "volume", 16)
    a = PatchDataset(vols, 6, seed=3)
    draws = [a[i % len(a)] for i in range(80)]
    assert all(d["image"].shape == d["target"].shape == (1, 6, 6, 6) for d in draws)
    assert all(type(d["image"]) is torch.Tensor for d in draws)  # plain tensors: the engine batches them
    with_nodule = np.mean([float(d["target"].sum() > 0) for d in draws])
    fraction = np.mean([float(vols[i]["target"].mean()) for i in range(len(vols))])
    assert with_nodule >= 0.45 and with_nodule > 5 * fraction
    b, c = PatchDataset(vols, 6, seed=3), PatchDataset(vols, 6, seed=3)
    assert all(torch.equal(b[i]["image"], c[i]["image"]) for i in range(4))
    # the patch is where the target says: each patch of the image occurs in its volume at the target's place
    item, full = a[0], vols[0]
    hits = [(z, y, x) for z in range(11) for y in range(11) for x in range(11)
            if torch.equal(full["image"][:, z:z + 6, y:y + 6, x:x + 6], item["image"])]
    assert hits and all(torch.equal(full["target"][:, z:z + 6, y:y + 6, x:x + 6], item["target"]) for z, y, x in hits)
    with pytest.raises(ValueError, match="volume items"):
        PatchDataset(ItemDataset(cfg, real_items(real_root, "nodule"), "crop", 16), 6)
    with pytest.raises(ValueError, match="patch side"):
        PatchDataset(vols, 32)


def test_a_shared_store_loads_each_item_once(cfg, real_root, monkeypatch):
    table = real_items(real_root, "nodule")
    calls = []
    read = ItemDataset._read

    def counting(self, idx):
        calls.append(self.table.iloc[idx]["item_id"])
        return read(self, idx)

    monkeypatch.setattr(ItemDataset, "_read", counting)
    store: dict = {}
    first = ItemDataset(cfg, table, "crop", 16, store)
    second = ItemDataset(cfg, table.iloc[::-1], "crop", 16, store)
    a = [first[i] for i in range(len(first))]
    b = [second[i] for i in range(len(second))]
    assert sorted(calls) == sorted(table["item_id"])  # one read per item for both datasets
    assert [x["index"] for x in b] == list(range(len(second)))  # each dataset's own row numbers
    assert np.array_equal(a[0]["image"].numpy(), b[-1]["image"].numpy())


def test_only_generated_nodules_are_synthetic_items(tmp_path, real_root, synthetic_train):
    """An inpainting dataset writes the background scan's real nodules beside the generated one; only rows flagged
    ``inpainted`` become synthetic items, and a dataset with no generated row holds no nodule items."""
    d = tmp_path / "inpainted"
    shutil.copytree(synthetic_train, d)
    nods = pd.read_csv(d / "nodules.csv")
    generated = nods["nodule_id"].iloc[::3].tolist()
    nods["inpainted"] = [True if n in generated else None for n in nods["nodule_id"]]  # csv: True or empty
    nods.to_csv(d / "nodules.csv", index=False)
    items = synthetic_items(d, "nodule", real_root)
    assert sorted(items["nodule_id"]) == sorted(generated) and items["synthetic"].all()
    assert len(synthetic_items(synthetic_train, "nodule", real_root)) == len(nods)  # no flag: all generated
    nods["inpainted"] = None
    nods.to_csv(d / "nodules.csv", index=False)
    with pytest.raises(ValueError, match="holds no nodule items"):
        synthetic_items(d, "nodule", real_root)


def test_real_and_synthetic_crops_share_one_resolution(cfg, real_root, synthetic_train, tmp_path):
    """With a synthetic pool every crop, real or synthetic, train or evaluation, is cut from its volume at the
    coarsest volume spacing among them; a real volume finer than the synthetic ones is coarsened first."""
    from lungsynth.downstream.common import load_pools
    from lungsynth.downstream.data import coarsen

    pools = load_pools(cfg, "nodule", str(synthetic_train), real_root)
    for table in (pools.train, pools.evaluation, pools.synthetic):
        assert table["view"].isna().all() and (table["crop_from_mm"] == 4.0).all()
    assert "crop_from_mm" not in load_pools(cfg, "nodule", None, real_root).train.columns  # real only: views kept
    coarse = tmp_path / "coarse"
    shutil.copytree(synthetic_train, coarse)
    scans = pd.read_csv(coarse / "scans.csv")
    scans["spacing_mm"] = 8.0  # synthetic volumes on a grid twice as coarse as the real 4 mm ones
    scans.to_csv(coarse / "scans.csv", index=False)
    pools = load_pools(cfg, "nodule", str(coarse), real_root)
    assert {float(v) for t in (pools.train, pools.evaluation, pools.synthetic) for v in t["crop_from_mm"]} == {8.0}
    row = pools.train.iloc[0]
    ct = nib.load(str(Path(row["root"]) / row["ct"])).get_fdata().astype(np.float32)
    lab = nib.load(str(Path(row["root"]) / row["label"])).get_fdata()
    want_ct, _ = cut_crop(*coarsen(ct, lab, 4.0, 8.0),
                          [row[f"centroid_vox_{a}"] / 2 for a in "zyx"], 8.0, 16)
    item = ItemDataset(cfg, pools.train.iloc[:1], "crop", 16)[0]
    lo, hi = cfg.data.hu_min, cfg.data.hu_max
    assert np.allclose(item["image"][0].numpy(), np.clip((want_ct - lo) / (hi - lo), 0, 1), atol=1e-5)




def test_a_smaller_crop_is_the_centre_of_the_view_at_1_mm(cfg, real_root, tmp_path):
    """The classifiers' crops may be smaller than the prepared views: the item is the view's centre at its own 1 mm
    (the field a crop cut from the volume covers), not the whole view resized; a view smaller than asked gives way to
    a crop cut from the volume."""
    import shutil

    root = Path(shutil.copytree(real_root, tmp_path / "real"))
    r = real_items(root, "nodule", ("train",)).iloc[0]
    ct_hu = np.asanyarray(nib.load(str(root / r["ct"])).dataobj).astype(np.float32)
    lab = np.asanyarray(nib.load(str(root / r["label"])).dataobj)
    centre, spacing = (r["centroid_vox_z"], r["centroid_vox_y"], r["centroid_vox_x"]), float(r["spacing_mm"])
    ct, mask = cut_crop(ct_hu, lab, centre, spacing, 20)  # a 20 mm view, as data prepare writes them
    ct[:2] = 300.0  # a border only the whole view holds: a resize would carry it into the item
    (root / "views" / "crops").mkdir(parents=True, exist_ok=True)
    np.savez(root / "views" / "crops" / f"{r['nodule_id']}.npz", ct=ct, mask=mask)
    row = real_items(root, "nodule", ("train",)).iloc[[0]].reset_index(drop=True)
    assert row.loc[0, "view"] == f"views/crops/{r['nodule_id']}.npz"
    item = ItemDataset(cfg, row, "crop", 14)[0]
    lo, hi = cfg.data.hu_min, cfg.data.hu_max
    assert np.allclose(item["image"][0].numpy(), np.clip((ct[3:17, 3:17, 3:17] - lo) / (hi - lo), 0, 1), atol=1e-6)
    assert np.array_equal(item["target"][0].numpy(), mask[3:17, 3:17, 3:17])
    big = ItemDataset(cfg, row, "crop", 24)[0]  # larger than the view: cut from the volume instead
    assert np.array_equal(big["target"][0].numpy(), cut_crop(ct_hu, lab, centre, spacing, 24)[1])
