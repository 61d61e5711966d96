"""Chapter 03, train room: the training view pairs cached latents with their condition volumes."""

import importlib

import pytest
import torch
from land_tiny import tiny_cfg


def test_latents_and_conditions_pair_by_scan_id(monkeypatch):
    """A cache whose scans are not the split's is refused; the grids follow the cache's scan order."""
    land_train = importlib.import_module("lungsynth.methods.land.train")  # the room (land.train is the function)

    class Cache:
        def __init__(self, ids):
            self.ids, self.dir = ids, "cache"

        def __len__(self):
            return len(self.ids)

    conds = {f"s{k}": torch.full((1, 8, 8, 8), k / 5.0) for k in (1, 2)}
    monkeypatch.setattr(land_train, "iter_conditions", lambda cfg, split: iter(conds.items()))
    monkeypatch.setattr(land_train, "condition_grid", lambda c, variant, vae: c)
    import lungsynth.autoencoders as ae

    monkeypatch.setattr(ae, "LatentDataset", lambda cfg, kind, split: Cache(["s2", "s1"]))
    ds = land_train.build_dataset(tiny_cfg(), "mask")
    assert [float(g.max()) for g in ds.grids] == pytest.approx([0.4, 0.2])  # s2 first, as the cache holds it
    monkeypatch.setattr(ae, "LatentDataset", lambda cfg, kind, split: Cache(["s2", "s3"]))
    with pytest.raises(ValueError, match=r"not in the split: \['s3'\].*re-cut.*--split train"):
        land_train.build_dataset(tiny_cfg(), "mask")
