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


def test_regeneration_pastes_into_the_healthy_twin(cfg, vae, runs, crops):
    model = hr_ldm.load(cfg, runs[0], vae=vae, device="cpu")
    items = []
    for it in crops:
        healthy = it["ct"].clone()
        healthy[it["hrmask"][:1] > 0] = 150 / 1400  # the nodule's place in the twin: lung (-850 HU)
        items.append({**it, "healthy": healthy})
    gen = hr_ldm.generate_for_eval(model, items, n_per_subtype=1)
    assert gen["background_kind"] == "healthy twin" and len(gen["fake"]) == 3
    assert sorted(gen["subtype"].tolist()) == [0, 1, 2]
    outside = ~gen["region"]
    assert np.array_equal(gen["fake"][outside], gen["background"][outside])  # only the latent region changes
    assert not np.array_equal(gen["fake"][gen["mask"]], gen["background"][gen["mask"]])
    assert np.allclose(gen["background"][gen["mask"]], -850.0, atol=0.5)  # the twin, not the real nodule
    assert gen["mask"].sum() > 0 and (gen["region"] | ~gen["mask"]).all()  # the nodule lies in the region
    paste = hr_ldm.mean_paste(gen, {0: 0.0, 1: -300.0, 2: -600.0})
    for k, y in enumerate(gen["subtype"]):
        assert np.all(paste[k][gen["mask"][k]] == (0.0, -300.0, -600.0)[y])
        assert np.array_equal(paste[k][~gen["mask"][k]], gen["background"][k][~gen["mask"][k]])
    jsd = hr_ldm.subtype_jsd({**gen, "paste": paste}, cfg, "paste")
    assert all(0 < v <= np.log(2) + 1e-9 for v in jsd.values())
    med = hr_ldm.median_hu(gen, "real")
    assert med["solid"] > med["part-solid"] > med["ground-glass"]  # the fixture's -50 / -350 / -650 HU spheres
