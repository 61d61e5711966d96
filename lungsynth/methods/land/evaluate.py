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
from lungsynth.methods.land.train import HeldoutVolumes, default_run_dir


# MS-SSIM diversity is read on the first volumes of a set only: the pairs of 10 volumes (45) give a stable
# mean, and holding more would tie memory to the sample count (full: 100 volumes of 256^3 = 6.4 GB)
DIVERSITY_VOLUMES = 10


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


CONDITION_SETS = ("held-out", "unseen")
# the NLST stand-in's edits: nodules resized by a factor in this range and moved by up to an eighth of the
# volume, kept only where >= 95% of the moved nodule lies in the lung; one texture 1..5 drawn per volume
UNSEEN_SCALE = (0.75, 1.5)
UNSEEN_IN_LUNG = 0.95


def edit_condition(cond: torch.Tensor, rng: Any, tries: int = 20) -> torch.Tensor:
    """One unseen condition from a held-out one [1,1,S,S,S]: its nodules resized, moved inside the lung and
    re-textured with the edit functions of :mod:`lungsynth.nn.conditioning` (a mask without nodules is
    returned as it is)."""
    from lungsynth.nn.conditioning import lung_mask, move_nodule, nodule_mask, resize_nodule, set_texture

    if not bool(nodule_mask(cond).any()):
        return cond
    lung = lung_mask(cond) > 0
    out = resize_nodule(cond, float(rng.uniform(*UNSEEN_SCALE)))
    reach = max(1, cond.shape[-1] // 8)
    for _ in range(tries):
        shift = tuple(int(v) for v in rng.integers(-reach, reach + 1, 3))
        try:
            moved = move_nodule(out, shift)
        except ValueError:  # the shift leaves the volume: draw another
            continue
        nodule = nodule_mask(moved) > 0
        if float((nodule & lung).sum()) >= UNSEEN_IN_LUNG * float(nodule.sum()):
            out = moved
            break
    return set_texture(out, int(rng.integers(1, 6)))


def unseen_conditions(conds: torch.Tensor, first_index: int = 0, seed: int = 0) -> torch.Tensor:
    """The stand-in for the poster's unseen NLST masks: each held-out condition [n,1,S,S,S] edited by
    :func:`edit_condition`, item ``first_index + i`` with its own seeded stream (so chunks do not matter)."""
    import numpy as np

    return torch.cat([edit_condition(c[None], np.random.default_rng([int(seed), 7919, int(first_index) + i]))
                      for i, c in enumerate(conds)])


def _sampled_chunks(model: Any, held: HeldoutVolumes, spans: Sequence[range], variant: str, sampler: str | None,
                    steps: int | None, seed: int, timing: list[float], conditions: str = "held-out") -> Any:
    """One chunk of samples per span (conditions cycled from ``held``, edited for the ``unseen`` set), each
    appended to ``timing`` in seconds."""
    for span in spans:
        c = None if variant == "none" else held.chunk(span, "cond")
        if c is not None and conditions == "unseen":
            c = unseen_conditions(c, span.start, seed)
        out = sample(model, c, len(span), sampler=sampler, steps=steps, seed=seed, batch=len(span),
                     first_index=span.start)
        timing.append(out["seconds"])
        yield out["ct"]


def evaluate(cfg: Any, variants: Sequence[str] = VARIANTS, *, n_samples: int | None = None, sampler: str | None = None,
             steps: int | None = None, seed: int = 0, network: str | None = None, memory: bool = True,
             overrides: dict | None = None, samples: dict[str, torch.Tensor] | None = None,
             condition_sets: Sequence[str] = CONDITION_SETS, write: bool = True) -> list[dict[str, Any]]:
    """Table 1 of LAND for this run: per variant and condition set, FID and KID (with a bootstrap interval)
    on 3D CT features, MS-SSIM between samples, and peak memory of sampling one volume.

    Conditional variants sample on held-out (test, then val) masks, cycled to ``n_samples`` (default
    ``cfg.land.n_eval_samples``), and on the ``unseen`` stand-in for the poster's NLST masks (the same
    masks with their nodules moved, resized and re-textured, :func:`unseen_conditions`); both compare
    with the real held-out volumes, with the same seeds for every variant. ``none`` has no condition, so
    it has one row. ``samples`` (variant -> [N,1,S,S,S] in [0,1]) reuses held-out volumes already
    generated. Samples are drawn, decoded and featurised ``cfg.land.eval_batch`` at a time and the real
    volumes and conditions are read from disk as they are needed, so memory does not grow with
    ``n_samples``; MS-SSIM reads the first DIVERSITY_VOLUMES of each set.
    Writes ``runs/<profile>/03_land_table1.json`` (unless ``write`` is False) and returns the rows.
    """
    from lungsynth import paths
    from lungsynth.eval.distribution import fid, kid
    from lungsynth.eval.fidelity import ms_ssim_diversity
    from lungsynth.runtime import write_json_atomic

    unknown = [s for s in condition_sets if s not in CONDITION_SETS]
    if unknown:
        raise ValueError(f"unknown condition set(s) {unknown}; use {', '.join(CONDITION_SETS)}")
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
        model = None
        for conditions in condition_sets if variant != "none" else condition_sets[:1]:
            timing: list[float] = []
            if samples is not None and variant in samples and conditions == "held-out":
                given = samples[variant]
                chunks = (given[i:i + chunk] for i in range(0, len(given), chunk))
            else:
                if model is None:
                    fingerprint.refuse_overlap(run_dir, prepared_root(cfg), ("test", "val"), what=f"LAND {variant} run")
                    model = load(cfg, variant, run_dir)
                chunks = _sampled_chunks(model, held, spans, variant, sampler, steps, seed, timing, conditions)
            feats, _, kept = _streamed_features(chunks, network)
            f = fid(real_feats, feats, network=net_name)
            k = kid(real_feats, feats, subset_size=max(len(real_feats), len(feats)),
                    bootstrap=int(cfg.evaluation.bootstrap), seed=seed, network=net_name, min_samples_warn=0)
            div = ms_ssim_diversity(kept.numpy()) if len(kept) >= 2 else {"mean": float("nan")}
            secs = sum(timing) / n if timing else float("nan")
            row = {"variant": variant, "condition": CONDITIONS[variant],
                   "conditions": "-" if variant == "none" else conditions, "n_samples": int(len(feats)),
                   "fid": round(float(f.value), 3), "kid": round(float(k.value), 5),
                   "kid_ci": [round(float(v), 5) if v is not None else None for v in (k.ci_low, k.ci_high)],
                   "ms_ssim": round(div["mean"], 4), "sample_s_per_volume": round(secs, 2), "features": net_name}
            if memory and conditions == condition_sets[0]:
                mem = peak_sampling_memory(cfg, variant, run_dir, sampler=sampler, steps=2, overrides=overrides)
                row["peak_mb"] = round(mem["peak_mb"], 1)
                # CPU: how far sampling raised the peak RSS above the loaded model (0 = it stayed below
                # the import/load peak); CUDA: max allocated while sampling
                row["sampling_peak_increase_mb"] = round(mem["sampling_mb"], 1)
            rows.append(row)
    real_div = ms_ssim_diversity(real.numpy())["mean"] if len(real) >= 2 else float("nan")
    rows.append({"variant": "real (held-out)", "condition": "-", "conditions": "-", "n_samples": int(len(real_feats)),
                 "fid": 0.0, "ms_ssim": round(real_div, 4), "features": net_name})
    source = data_source(cfg)  # every table says which data its numbers come from
    rows = [{**r, "source": source} for r in rows]
    if write:
        write_json_atomic(paths.runs_dir(cfg.profile) / "03_land_table1.json", rows)
    return rows
