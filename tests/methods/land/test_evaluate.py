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
    calls = {"sample": [], "features": []}

    def fake_sample(model, cond, n, *, seed, first_index, batch, **kw):
        calls["sample"].append(n)
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
    monkeypatch.setattr("lungsynth.eval.features.extract_features", fake_features)
    monkeypatch.setenv("LUNGSYNTH_HOME", str(tmp_path))

    tables = {}
    for chunk in (2, 7):
        calls["sample"].clear(), calls["features"].clear(), held.reads.clear()
        cfg = tiny_cfg(16, **{"land.eval_batch": chunk})
        rows = land_eval.evaluate(cfg, ("none", "mask"), n_samples=7, memory=False, network="fake")
        assert max(calls["sample"]) <= chunk and sum(calls["sample"]) == 2 * 7
        assert max(calls["features"]) <= chunk and max(held.reads) <= chunk
        assert [r["n_samples"] for r in rows] == [7, 7, 5]  # two variants, then the 5 real volumes
        tables[chunk] = [(r["variant"], r["fid"]) for r in rows]
    assert tables[2] == tables[7]
