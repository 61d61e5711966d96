"""LAND (chapter 03) evaluate room: Table 1 drawn, decoded and featurised in chunks, conditions streamed."""

import importlib

import numpy as np
import torch
from land_tiny import phantom_cond, tiny_cfg

land_eval = importlib.import_module("lungsynth.methods.land.evaluate")  # the module; the package exports its function


class _FakeHeldout:
    """Held-out volumes made on demand; records the size of every chunk read."""

    def __init__(self, n=5):
        self.n, self.reads = n, []

    def __len__(self):
        return self.n

    def chunk(self, indices, key):
        indices = list(indices)
        self.reads.append(len(indices))
        return torch.cat([phantom_cond(16, (2 + i % self.n, 4, 4), 4) for i in indices])


def test_evaluate_never_holds_more_than_one_chunk(monkeypatch, tmp_path):
    """Sampling, decoding and features all go eval_batch volumes at a time, whatever n_samples is; the
    rows do not depend on the chunk size (each volume keeps its own noise)."""
    held = _FakeHeldout()
    calls = {"sample": [], "features": [], "conds": []}

    def fake_sample(model, cond, n, *, seed, first_index, batch, **kw):
        calls["sample"].append(n)
        calls["conds"].append(None if cond is None else cond.clone())
        assert cond is None or len(cond) == n
        vols = torch.stack([torch.full((1, 16, 16, 16), float(np.random.default_rng([seed, first_index + i]).random()))
                            for i in range(n)])
        return {"ct": vols, "seconds": 0.1 * n}

    def fake_features(data, network, intensity):
        calls["features"].append(len(data))
        x = np.asarray(data).reshape(len(data), -1)
        return np.stack([x.mean(1), x.std(1), x.max(1), x.min(1)], 1), "fake"

    monkeypatch.setattr(land_eval, "HeldoutVolumes", lambda cfg: held)
    monkeypatch.setattr(land_eval, "sample", fake_sample)
    monkeypatch.setattr(land_eval, "load", lambda cfg, variant, run_dir: object())
    monkeypatch.setattr(land_eval.fingerprint, "refuse_overlap", lambda *a, **k: None)
    monkeypatch.setattr(land_eval, "data_source", lambda cfg: "phantom")
    monkeypatch.setattr(land_eval, "prepared_root", lambda cfg: tmp_path)
    monkeypatch.setattr("lungsynth.eval.features.extract_features", fake_features)
    monkeypatch.setenv("LUNGSYNTH_HOME", str(tmp_path))

    tables = {}
    for chunk in (2, 7):
        calls["sample"].clear(), calls["features"].clear(), calls["conds"].clear(), held.reads.clear()
        cfg = tiny_cfg(16, **{"land.eval_batch": chunk})
        rows = land_eval.evaluate(cfg, ("none", "mask"), n_samples=7, memory=False, network="fake")
        assert max(calls["sample"]) <= chunk
        assert max(calls["features"]) <= chunk and max(held.reads) <= chunk
        # none once, mask on held-out and on unseen conditions, then the 5 real volumes
        assert [(r["variant"], r["conditions"], r["n_samples"]) for r in rows] == [
            ("none", "-", 7), ("mask", "held-out", 7), ("mask", "unseen", 7), ("real (held-out)", "-", 5)]
        assert sum(calls["sample"]) == 3 * 7
        given = [c for c in calls["conds"] if c is not None]  # mask: held-out chunks, then unseen ones
        half = len(given) // 2
        assert all(not torch.equal(a, b) for a, b in zip(given[:half], given[half:]))
        tables[chunk] = [(r["variant"], r["fid"], r.get("kid")) for r in rows]
    assert tables[2] == tables[7]


def test_unseen_conditions_move_resize_and_retexture_inside_the_lung():
    """The NLST stand-in: every nodule ends up >= 95% inside the lung, with one texture per volume, the lung
    itself is unchanged, and item i is edited the same whether it comes alone or in a chunk."""
    from lungsynth.nn.conditioning import lung_mask, nodule_mask, texture_map

    conds = torch.cat([phantom_cond(32, (8 + i, 10, 12 - i), 5, texture=1 + i) for i in range(4)])
    edited = land_eval.unseen_conditions(conds, first_index=0, seed=0)
    assert edited.shape == conds.shape
    for c, e in zip(conds, edited):
        nod = nodule_mask(e) > 0
        assert nod.any() and float((nod & (lung_mask(c) > 0)).sum()) >= 0.95 * float(nod.sum())
        assert torch.equal(lung_mask(c), lung_mask(e))
        assert len(texture_map(e)[nod].unique()) == 1
    assert not torch.equal(edited, conds)
    assert torch.equal(land_eval.unseen_conditions(conds[2:3], first_index=2, seed=0), edited[2:3])
    assert not torch.equal(land_eval.unseen_conditions(conds, first_index=0, seed=1), edited)
