"""LAND (chapter 03): Table 1 of the poster for this run (FID, MS-SSIM, peak memory per variant) and the
mean HU inside the nodule (the texture sweep's measure)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from lungsynth.data import fingerprint
from lungsynth.data.datasets import data_source, prepared_root
from lungsynth.methods.land.bench import peak_sampling_memory
from lungsynth.methods.land.model import CONDITIONS, VARIANTS
from lungsynth.methods.land.sample import load, sample
from lungsynth.methods.land.train import default_run_dir


# MS-SSIM diversity is read on the first volumes of a set only: the pairs of 10 volumes (45) give a stable
# mean, and holding more would tie memory to the sample count (full: 100 volumes of 256^3 = 6.4 GB)
DIVERSITY_VOLUMES = 10


class HeldoutVolumes:
    """The held-out prepared volumes of ``splits``, read from disk one at a time (never all in memory).

    ``len()`` items; ``chunk(indices, key)`` stacks ``key`` ("ct" in [0, 1] or "cond") of those items,
    indices taken modulo the count (a longer run cycles the conditions): [n, 1, S, S, S].
    """

    def __init__(self, cfg: Any, splits: Sequence[str] = ("test", "val")) -> None:
        from lungsynth.data.datasets import VolumeDataset

        # one dataset per key, so reading the CT does not also read the condition (and the other way)
        self.sets = {key: [VolumeDataset(cfg, split, keys=(key,)) for split in splits] for key in ("ct", "cond")}
        self.index = [(k, i) for k, ds in enumerate(self.sets["ct"]) for i in range(len(ds))]
        if not self.index:
            raise ValueError(f"the {', '.join(splits)} splits of profile {cfg.profile} are empty; prepare more "
                             "scans (cfg.data.n_scans)")

    def __len__(self) -> int:
        return len(self.index)

    def chunk(self, indices: Sequence[int], key: str) -> torch.Tensor:
        items = [self.index[int(i) % len(self.index)] for i in indices]
        return torch.stack([torch.as_tensor(self.sets[key][k][i][key]).float() for k, i in items])


def real_volumes(cfg: Any, splits: Sequence[str] = ("test", "val"), n: int | None = None) -> torch.Tensor:
    """Real CT volumes in [0, 1] of the held-out splits (the first ``n``, default all): [N, 1, S, S, S]."""
    held = HeldoutVolumes(cfg, splits)
    return held.chunk(range(len(held) if n is None else min(int(n), len(held))), "ct")


def _streamed_features(chunks: Any, network: str) -> tuple[Any, str, torch.Tensor]:
    """Features of every volume of ``chunks`` (an iterable of [n,1,S,S,S] in [0, 1]), computed chunk by
    chunk, and the first DIVERSITY_VOLUMES volumes: (features [N, F], network name, kept volumes)."""
    import numpy as np

    from lungsynth.eval.features import extract_features

    feats, kept, name = [], [], network
    for vols in chunks:
        f, name = extract_features(vols.numpy(), network, "unit")
        feats.append(f)
        room = DIVERSITY_VOLUMES - sum(len(k) for k in kept)
        if room > 0:
            kept.append(vols[:room])
    return np.concatenate(feats), name, torch.cat(kept)


def nodule_mean_hu(ct_hu: torch.Tensor, cond: torch.Tensor) -> list[float]:
    """Mean HU inside the nodule of each volume: ct_hu, cond [B,1,S,S,S] -> B floats (NaN if no nodule)."""
    from lungsynth.nn.conditioning import nodule_mask

    m = nodule_mask(cond).expand_as(ct_hu) > 0
    return [float(ct_hu[b][m[b]].mean()) if bool(m[b].any()) else float("nan") for b in range(ct_hu.shape[0])]


def _sampled_chunks(model: Any, held: HeldoutVolumes, spans: Sequence[range], variant: str, sampler: str | None,
                    steps: int | None, seed: int, timing: list[float]) -> Any:
    """One chunk of samples per span (conditions cycled from ``held``), each appended to ``timing`` in seconds."""
    for span in spans:
        c = None if variant == "none" else held.chunk(span, "cond")
        out = sample(model, c, len(span), sampler=sampler, steps=steps, seed=seed, batch=len(span),
                     first_index=span.start)
        timing.append(out["seconds"])
        yield out["ct"]


def evaluate(cfg: Any, variants: Sequence[str] = VARIANTS, *, n_samples: int | None = None, sampler: str | None = None,
             steps: int | None = None, seed: int = 0, network: str | None = None, memory: bool = True,
             overrides: dict | None = None, samples: dict[str, torch.Tensor] | None = None) -> list[dict[str, Any]]:
    """Table 1 of LAND for this run: per variant FID (3D CT features), MS-SSIM between samples, peak memory.

    Conditional variants sample on held-out (test, then val) masks, cycled to ``n_samples``
    (default ``cfg.land.n_eval_samples``); FID compares with the real held-out volumes.
    ``samples`` (variant -> [N,1,S,S,S] in [0,1]) reuses volumes already generated. Samples are drawn,
    decoded and featurised ``cfg.land.eval_batch`` at a time and the real volumes and conditions are read
    from disk as they are needed, so memory does not grow with ``n_samples``; MS-SSIM reads the first
    DIVERSITY_VOLUMES of each set.
    Writes ``runs/<profile>/03_land_table1.json`` and returns the rows.
    """
    from lungsynth import paths
    from lungsynth.eval.distribution import fid
    from lungsynth.eval.fidelity import ms_ssim_diversity
    from lungsynth.runtime import write_json_atomic

    n = int(n_samples or cfg.land.n_eval_samples)
    chunk = max(1, int(cfg.land.eval_batch))
    network = network or cfg.evaluation.feature_network
    held = HeldoutVolumes(cfg)
    spans = [range(i, min(n, i + chunk)) for i in range(0, n, chunk)]
    real_feats, net_name, real = _streamed_features(
        (held.chunk(range(i, min(len(held), i + chunk)), "ct") for i in range(0, len(held), chunk)), network)
    rows = []
    for variant in variants:
        run_dir = default_run_dir(cfg, variant)
        timing: list[float] = []
        if samples is not None and variant in samples:
            given = samples[variant]
            chunks = (given[i:i + chunk] for i in range(0, len(given), chunk))
        else:
            fingerprint.refuse_overlap(run_dir, prepared_root(cfg), ("test", "val"), what=f"LAND {variant} run")
            model = load(cfg, variant, run_dir)
            chunks = _sampled_chunks(model, held, spans, variant, sampler, steps, seed, timing)
        feats, _, kept = _streamed_features(chunks, network)
        f = fid(real_feats, feats, network=net_name)
        div = ms_ssim_diversity(kept.numpy()) if len(kept) >= 2 else {"mean": float("nan")}
        secs = sum(timing) / n if timing else float("nan")
        row = {"variant": variant, "condition": CONDITIONS[variant], "n_samples": int(len(feats)),
               "fid": round(float(f.value), 3), "ms_ssim": round(div["mean"], 4),
               "sample_s_per_volume": round(secs, 2), "features": net_name}
        if memory:
            mem = peak_sampling_memory(cfg, variant, run_dir, sampler=sampler, steps=2, overrides=overrides)
            row["peak_mb"] = round(mem["peak_mb"], 1)
            # CPU: how far sampling raised the peak RSS above the loaded model (0 = it stayed below
            # the import/load peak); CUDA: max allocated while sampling
            row["sampling_peak_increase_mb"] = round(mem["sampling_mb"], 1)
        rows.append(row)
    real_div = ms_ssim_diversity(real.numpy())["mean"] if len(real) >= 2 else float("nan")
    rows.append({"variant": "real (held-out)", "condition": "-", "n_samples": int(len(real_feats)), "fid": 0.0,
                 "ms_ssim": round(real_div, 4), "features": net_name})
    source = data_source(cfg)  # every table says which data its numbers come from
    rows = [{**r, "source": source} for r in rows]
    write_json_atomic(paths.runs_dir(cfg.profile) / "03_land_table1.json", rows)
    return rows
