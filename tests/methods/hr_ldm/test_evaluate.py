"""Chapter 05 — HR-LDM, the evaluate room: no duplicated crops, the healthy background, the gate baselines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lungsynth.methods import hr_ldm


def test_evaluation_sets_never_repeat_a_crop():
    items = [{"subtype_id": y} for y in (0, 0, 0, 0, 1, 2, 2)]
    picked, available = hr_ldm.pick_per_subtype(items, 3)
    assert picked == [0, 1, 2, 4, 5, 6]  # part-solid enters with its one nodule, not three copies
    assert len(set(picked)) == len(picked)
    assert available == {"solid": 4, "part-solid": 1, "ground-glass": 2}


def test_table1_never_scores_a_crop_against_the_real_crop_of_its_own_scan(cfg):
    """Table 1's FID/KID/MMD compare regenerated nodules of one half of the scans with the real nodules of the other:
    a generator that returns each real crop unchanged scores 0 when paired with its own scan, and not here."""
    scans = np.array(["a", "a", "b", "c", "c", "d", "e", "f"])
    first, second = hr_ldm.disjoint_halves(scans, seed=0)
    assert len(first) == len(second) and not set(scans[first]) & set(scans[second])
    assert len(set(first) | set(second)) == len(first) + len(second)  # no crop twice
    with pytest.raises(ValueError, match="at least 2 known scans"):
        hr_ldm.disjoint_halves(["a", "a", "a"])
    rng = np.random.default_rng(0)
    real = rng.normal(-600, 150, (8, 16, 16, 16)).astype(np.float32)
    mask = np.zeros(real.shape, bool)
    mask[:, 6:10, 6:10, 6:10] = True
    gen = {"real": real, "fake": real.copy(), "background": real.copy(), "mask": mask, "scan_id": scans,
           "subtype": np.array([0, 1, 2, 0, 1, 2, 0, 1])}
    row = hr_ldm.metrics_for(cfg, gen)
    assert row["n_per_half"] == len(first) and row["n"] == 8
    assert row["jsd_mean"] == pytest.approx(0.0, abs=1e-9)  # the paired measure: the same nodules, unchanged
    assert row["fid"] > 1.0 and np.isfinite(row["kid"])  # the distribution measure: other scans' nodules


def test_regeneration_pastes_into_the_healthy_twin(cfg, vae, runs, crops):
    model = hr_ldm.load(cfg, runs[0], vae=vae, device="cpu")
    items = []
    for it in crops:
        healthy = it["ct"].clone()
        healthy[it["hrmask"][:1] > 0] = 150 / 1400  # the nodule's place in the twin: lung (-850 HU)
        items.append({**it, "healthy": healthy})
    gen = hr_ldm.generate_for_eval(model, items, n_per_subtype=1)
    assert gen["background_kind"] == "healthy twin" and len(gen["fake"]) == 3
    assert gen["scan_id"].tolist() == [items[i]["scan_id"] for i in (0, 1, 2)]  # each crop's scan, for Table 1
    assert sorted(gen["subtype"].tolist()) == [0, 1, 2]
    outside = ~gen["region"]
    assert np.array_equal(gen["fake"][outside], gen["background"][outside])  # only the latent region changes
    assert not np.array_equal(gen["fake"][gen["mask"]], gen["background"][gen["mask"]])
    assert np.allclose(gen["background"][gen["mask"]], -850.0, atol=0.5)  # the twin, not the real nodule
    assert gen["mask"].sum() > 0 and (gen["region"] | ~gen["mask"]).all()  # the nodule lies in the region
    assert hr_ldm.ring_change(gen, "background") == (0.0, 3)
    own, n = hr_ldm.ring_change(gen, "real")  # the fixture's twin differs from its crop inside the mask only
    assert n == 3 and own == 0.0
    shifted = {**gen, "real": gen["real"] + 10.0}
    assert hr_ldm.ring_change(shifted, "real")[0] == pytest.approx(10.0)
    paste = hr_ldm.mean_paste(gen, {0: 0.0, 1: -300.0, 2: -600.0})
    for k, y in enumerate(gen["subtype"]):
        assert np.all(paste[k][gen["mask"][k]] == (0.0, -300.0, -600.0)[y])
        assert np.array_equal(paste[k][~gen["mask"][k]], gen["background"][k][~gen["mask"][k]])
    jsd = hr_ldm.subtype_jsd({**gen, "paste": paste}, cfg, "paste")
    assert all(0 < v <= 1.0 + 1e-9 for v in jsd.values())  # bits
    med = hr_ldm.median_hu(gen, "real")
    assert med["solid"] > med["part-solid"] > med["ground-glass"]  # the fixture's -50 / -350 / -650 HU spheres
