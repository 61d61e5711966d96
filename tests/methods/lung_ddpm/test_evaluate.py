"""Chapter 06, Lung-DDPM's evaluate room: the seam ratio and a metrics row."""

from __future__ import annotations

import copy

import pytest
import torch
from lung_ddpm_toys import S, tiny_cfg, toy_batch

import importlib

from lungsynth.methods import lung_ddpm as ld

ev = importlib.import_module("lungsynth.methods.lung_ddpm.evaluate")  # the package exports a function "evaluate"


def test_seam_ratio(toy_data):
    ct, layout = toy_batch(toy_data)
    lung = ld.generation_mask(layout)
    assert torch.allclose(ld.seam_ratio(ct, ct, lung), torch.ones(2, dtype=torch.float64))
    shell = ld.boundary_shell(lung)
    inner, outer = shell & lung, shell & ~lung
    assert bool(inner.any()) and bool(outer.any())  # the shell straddles the boundary
    assert not bool((shell & ~ld.boundary_shell(lung, 2)).any())  # and grows with the width
    smooth = torch.linspace(0.3, 0.5, S).expand(2, 1, S, S, S).contiguous()  # no edge at the lung boundary
    seamed = torch.where(lung, smooth + 0.2, smooth)  # a pasted region with an intensity step: a seam
    assert bool((ld.seam_ratio(seamed, smooth, lung) > 5).all())
    with pytest.raises(ValueError, match="no boundary"):
        ld.seam_ratio(ct, ct, torch.zeros_like(lung))


def test_metrics_row(toy_data):
    cfg = tiny_cfg()
    ct, layout = toy_batch(toy_data, 3)
    noisy = (ct + 0.05 * torch.randn(ct.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    row = ld.metrics(cfg, noisy, ct, layout)
    assert set(row) >= {"fid", "fid_ci", "mmd", "mmd_ci", "masked_mse", "seam_ratio", "n", "features"}
    assert row["n"] == 3 and row["masked_mse"] > 0 and row["seam_ratio"] > 1
    assert cfg.evaluation.bootstrap > 0  # the intervals of the ablation table (paper Table IV) ...
    for key in ("fid_ci", "mmd_ci"):  # ... which 3 volumes are too few for
        assert row[key].startswith("insufficient N: an interval needs >= 8")
    assert row["fake_features"].shape[0] == 3
    same = ld.metrics(cfg, ct, ct, layout)
    assert same["masked_mse"] == 0 and same["seam_ratio"] == pytest.approx(1.0) and same["fid"] == pytest.approx(0, abs=1e-6)


def test_gate_measures_read_the_lung_the_nodules_and_the_seam(toy_data):
    """A volume against itself: lung JSD 0, its nodules keep all their contrast, seam ratio 1; shuffled voxels
    give a lung histogram far from the real one; lung-centred crops are centred on the lungs."""
    import numpy as np

    from lungsynth.autoencoders.evaluate import body_mask
    from lungsynth.eval.baselines import shuffle_in_body
    from lungsynth.eval.nodules import contrast_share

    cfg = tiny_cfg(**{"data.size_3d": 16, "data.spacing_3d_mm": 3.0})  # 3 mm voxels: the toy nodule is ~8 mm
    d = toy_data[0]
    layout = ld.make_layout(d["lung"][None], d["label"][None])[0, 0].numpy()
    hu = d["ct"][0].numpy() * 1400.0 - 1000.0
    same = ev.volume_measures(cfg, hu, hu, layout)
    assert same["lung_jsd"] == pytest.approx(0.0, abs=1e-9) and same["seam_ratio"] == pytest.approx(1.0)
    assert len(same["contrasts"]) == 1 and same["contrasts"] == same["real_contrasts"]
    assert same["contrasts"][0] > 500  # the toy nodule (0.75) against its lung (0.15): ~840 HU
    assert contrast_share(same["contrasts"], same["real_contrasts"]) == (1.0, 1)
    noise = shuffle_in_body(hu[None], body_mask(hu)[None], seed=0)[0]
    assert ev.volume_measures(cfg, noise, hu, layout)["lung_jsd"] > 0.3
    flat = np.where(layout == 2, hu[layout == 1].mean(), hu)  # the nodule painted over with lung
    assert ev.volume_measures(cfg, flat, hu, layout)["contrasts"][0] < 0.5 * same["real_contrasts"][0]

    vols = torch.stack([t["ct"] for t in toy_data])
    lays = torch.stack([ld.make_layout(t["lung"][None], t["label"][None])[0] for t in toy_data])
    crops = ev.lung_crops(vols, lays, 8)
    assert crops.shape == (3, 1, 8, 8, 8)
    lung_share = ev.lung_crops(lays, lays, 8).ge(1).float().mean()
    assert lung_share > (lays >= 1).float().mean()  # more lung inside the crop than in the whole volume


def test_gates_never_pass_on_too_few_volumes(trained, toy_data, monkeypatch):
    """Three toy volumes (the gates need 8): every row is 'insufficient N', never a pass; the rows name the
    sampler and steps they judged."""
    cfg, runs = trained
    monkeypatch.setattr(ev, "eval_volumes", lambda cfg, split=None, n=None: {
        "ct": torch.stack([t["ct"] for t in toy_data] * 2),
        "layout": torch.stack([ld.make_layout(t["lung"][None], t["label"][None])[0] for t in toy_data] * 2),
        "scan_id": [t["scan_id"] for t in toy_data] * 2})
    model = ld.load(cfg, "layout", runs["layout"], train_if_missing=False)
    samplers_seen = []
    generate = ev.generate
    monkeypatch.setattr(ev, "generate", lambda *a, **kw: samplers_seen.append(kw["sampler"]) or generate(*a, **kw))
    rows = ev.measure(cfg, model)
    # the configured sampler (DDPM) and the fast one (gate 5), six rows each, sampled by each
    assert ev.gate_samplers(cfg) == ["ddpm", "ddim"] and samplers_seen == ["ddpm", "ddim"]
    assert len(rows) == 12 and all(r.status == "insufficient N" for r in rows)
    assert all("(ddpm, 3 steps)" in r.name for r in rows[:6])
    assert all("(ddim, 3 steps (gate 5: the fast sampler))" in r.name for r in rows[6:])
    assert rows[0].n == 3 and rows[0].baseline > 0.3  # the noise baseline: shuffled voxels fill the toy lungs
    assert rows[6].baseline == rows[0].baseline  # one baseline for both
    fast_only = copy.deepcopy(cfg)
    fast_only.lung_ddpm.sampler = "ddim"
    assert ev.gate_samplers(fast_only) == ["ddim"]


def test_gates_sample_nothing_when_a_half_holds_one_volume(trained, toy_data, monkeypatch):
    """Two held-out volumes (the smoke test split) make halves of one: no sampling, no KID of one item, every
    row 'insufficient N' with nothing measured."""
    cfg, runs = trained
    monkeypatch.setattr(ev, "eval_volumes", lambda cfg, split=None, n=None: {
        "ct": torch.stack([t["ct"] for t in toy_data[:2]]),
        "layout": torch.stack([ld.make_layout(t["lung"][None], t["label"][None])[0] for t in toy_data[:2]]),
        "scan_id": [t["scan_id"] for t in toy_data[:2]]})
    monkeypatch.setattr(ev, "generate", lambda *a, **kw: pytest.fail("sampled with one volume per half"))
    rows = ev.measure(cfg, ld.load(cfg, "layout", runs["layout"], train_if_missing=False))
    assert len(rows) == 12 and all(r.status == "insufficient N" and r.value is None for r in rows)
