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
from lungsynth.methods.land.train import default_run_dir, heldout_conditions


def real_volumes(cfg: Any, splits: Sequence[str] = ("test", "val")) -> torch.Tensor:
    """Real CT volumes in [0, 1] of the held-out splits: [N, 1, S, S, S]."""
    from lungsynth.data.datasets import VolumeDataset

    out = []
    for split in splits:
        ds = VolumeDataset(cfg, split, keys=("ct",))
        out += [torch.as_tensor(ds[i]["ct"]).float() for i in range(len(ds))]
    return torch.stack(out)


def nodule_mean_hu(ct_hu: torch.Tensor, cond: torch.Tensor) -> list[float]:
    """Mean HU inside the nodule of each volume: ct_hu, cond [B,1,S,S,S] -> B floats (NaN if no nodule)."""
    from lungsynth.nn.conditioning import nodule_mask

    m = nodule_mask(cond).expand_as(ct_hu) > 0
    return [float(ct_hu[b][m[b]].mean()) if bool(m[b].any()) else float("nan") for b in range(ct_hu.shape[0])]


def evaluate(cfg: Any, variants: Sequence[str] = VARIANTS, *, n_samples: int | None = None, sampler: str | None = None,
             steps: int | None = None, seed: int = 0, network: str | None = None, memory: bool = True,
             overrides: dict | None = None, samples: dict[str, torch.Tensor] | None = None) -> list[dict[str, Any]]:
    """Table 1 of LAND for this run: per variant FID (3D CT features), MS-SSIM between samples, peak memory.

    Conditional variants sample on held-out (test, then val) masks, cycled to ``n_samples``
    (default ``cfg.land.n_eval_samples``); FID compares with the real held-out volumes.
    ``samples`` (variant -> [N,1,S,S,S] in [0,1]) reuses volumes already generated.
    Writes ``runs/<profile>/03_land_table1.json`` and returns the rows.
    """
    from lungsynth import paths
    from lungsynth.eval.distribution import fid
    from lungsynth.eval.features import extract_features
    from lungsynth.eval.fidelity import ms_ssim_diversity
    from lungsynth.runtime import write_json_atomic

    n = int(n_samples or cfg.land.n_eval_samples)
    network = network or cfg.evaluation.feature_network
    real = real_volumes(cfg)
    real_feats, net_name = extract_features(real.numpy(), network, "unit")
    conds = torch.cat([heldout_conditions(cfg, "test"), heldout_conditions(cfg, "val")])
    rows = []
    for variant in variants:
        run_dir = default_run_dir(cfg, variant)
        if samples is not None and variant in samples:
            vols, secs = samples[variant], float("nan")
        else:
            fingerprint.refuse_overlap(run_dir, prepared_root(cfg), ("test", "val"), what=f"LAND {variant} run")
            model = load(cfg, variant, run_dir)
            c = None if variant == "none" else conds[torch.arange(n) % len(conds)]
            out = sample(model, c, n, sampler=sampler, steps=steps, seed=seed)
            vols, secs = out["ct"], out["seconds"] / n
        feats, _ = extract_features(vols.numpy(), network, "unit")
        f = fid(real_feats, feats, network=net_name)
        div = ms_ssim_diversity(vols.numpy()) if len(vols) >= 2 else {"mean": float("nan")}
        row = {"variant": variant, "condition": CONDITIONS[variant], "n_samples": int(len(vols)),
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
    rows.append({"variant": "real (held-out)", "condition": "-", "n_samples": int(len(real)), "fid": 0.0,
                 "ms_ssim": round(real_div, 4), "features": net_name})
    source = data_source(cfg)  # every table says which data its numbers come from
    rows = [{**r, "source": source} for r in rows]
    write_json_atomic(paths.runs_dir(cfg.profile) / "03_land_table1.json", rows)
    return rows
