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
