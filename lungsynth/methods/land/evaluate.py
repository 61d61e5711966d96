"""LAND (chapter 03): Table 1 of the poster for this run (FID, KID, MS-SSIM, peak memory per variant and
condition set) and the chapter's quality gates: does each variant make anatomy that follows its mask?

Gates. Every gate reads volumes sampled on held-out conditions against a baseline measured in the same run on
the same conditions. The held-out volumes (test, then val) are cut in two halves
(:func:`lungsynth.eval.baselines.halves`): the conditional variants sample on the first ``n`` conditions of
half A, whose real volumes are their pairs; the KID gate compares every set with half R.

1. anatomy: the classical lung mask of each conditional sample against its condition's lung, mean Dice;
   ``none`` has no mask to follow, so its lung-volume fraction must lie inside the real 5th-95th percentile;
2. intensities: the mean HU of the lung and of soft tissue, against the real held-out means;
3. nodules follow the mask: for each condition nodule >= 6 mm, its contrast (mean HU inside minus a 3 mm
   lung shell around it) against the same contrast in the real volume of that condition;
4. texture control (``latentmask-texture``): Spearman of the requested texture 1..5 and the nodule's HU;
5. distribution: KID against half R, read against the real-vs-real floor, the shuffled-voxel noise baseline
   and the vae3d ceiling (:mod:`lungsynth.eval.baselines`).

Everything is streamed ``cfg.land.eval_batch`` volumes at a time. Rows are cached in
``runs/<profile>/03_land_gates.json`` under the checkpoints' digests, the data fingerprint and
:data:`GATES_VERSION`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from lungsynth.data import fingerprint
from lungsynth.data.datasets import data_source, prepared_root
from lungsynth.eval.fidelity import dice
from lungsynth.eval.nodules import (MIN_CONTRAST_RATIO, MIN_NODULE_MM, SHELL_MM, contrast_share, nodule_contrast,
                                    spearman, sphere_diameter_mm)
from lungsynth.gates import Gate, info, judge, not_trained
from lungsynth.methods.land.model import CONDITIONS, VARIANTS
from lungsynth.methods.land.sample import load, peak_sampling_memory, sample
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
    """Table 1 of LAND for this run: per variant and condition set, FID and KID (with a half-sampling interval)
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
    memories = peak_sampling_memory(cfg, variants, sampler=sampler, steps=2, overrides=overrides) if memory else {}
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
                   "kid_ci": k.interval(5),  # (low, high), or "insufficient N: ..." below 8 volumes a set
                   "ms_ssim": round(div["mean"], 4), "sample_s_per_volume": round(secs, 2), "features": net_name}
            if memory and conditions == condition_sets[0]:
                mem = memories[variant]
                row["peak_mb"] = round(mem["peak_mb"], 1)
                # CPU: how far sampling raised the peak RSS above the loaded model (0 = it stayed below
                # the import/load peak); CUDA: max allocated while sampling
                row["sampling_peak_increase_mb"] = round(mem["sampling_mb"], 1)
            rows.append(row)
    real_div = ms_ssim_diversity(real.numpy())["mean"] if len(real) >= 2 else float("nan")
    rows.append({"variant": "real (held-out)", "condition": "-", "conditions": "-", "ms_ssim": round(real_div, 4),
                 "features": net_name, **_real_floor(real_feats, net_name, seed)})
    source = data_source(cfg)  # every table says which data its numbers come from
    rows = [{**r, "source": source} for r in rows]
    if write:
        write_json_atomic(paths.runs_dir(cfg.profile) / "03_land_table1.json", rows)
    return rows


def _real_floor(real_feats: Any, net_name: str, seed: int) -> dict[str, Any]:
    """The real row's FID and KID: one half of the held-out volumes against the other (what a perfect generator
    would score at that N), measured, never set; ``None`` below 4 volumes (halves of 2)."""
    from lungsynth.eval.baselines import halves
    from lungsynth.eval.distribution import fid, kid

    feats = np.asarray(real_feats)
    if len(feats) < 4:
        return {"n_samples": int(len(feats)), "fid": None, "kid": None}
    a, b = halves(len(feats), seed)
    f = fid(feats[b], feats[a], network=net_name, min_samples_warn=0)
    k = kid(feats[b], feats[a], subset_size=len(feats), network=net_name, min_samples_warn=0)
    return {"n_samples": int(len(a)), "fid": round(float(f.value), 3), "kid": round(float(k.value), 5),
            "conditions": f"half against half ({len(a)} / {len(b)})"}


# --------------------------------------------------------------------------- quality gates

CHAPTER = "03"
GATES_VERSION = 4  # 2: the vae3d ceiling of the nodule gate; 3: the noise baseline shuffles the lungs too;
# 4: the intensity rows give the real mean HU in their detail, not as a baseline
GATES_FILE = "03_land_gates.json"
# thresholds (fixed here; never loosened to pass): the issue's reading of "anatomy follows the mask"
MIN_LUNG_DICE = 0.8  # the classical mask of a real volume meets its own condition lung at ~0.9+
MAX_HU_GAP = 60.0  # HU: lung parenchyma spans ~-900..-700, so 60 HU is a tenth of its range
# a generated nodule keeps at least MIN_CONTRAST_RATIO (lungsynth.eval.nodules, 0.5) of its real contrast ...
MIN_NODULE_SHARE = 0.8  # ... in at least 80% of the condition's nodules >= 6 mm
MIN_TEXTURE_SPEARMAN = 0.7  # texture 1 (ground glass) .. 5 (solid) must order the nodule's HU
MAX_KID_SHARE = 0.1  # KID at most a tenth of the noise baseline's: far nearer real than shuffled voxels
MIN_SAMPLES = 8  # fewer samples per set: KID and the means are too noisy to judge ("insufficient N")
MIN_NODULES = 5
SWEEP_CONDITIONS = 2  # the texture sweep runs on the held-out conditions with the largest nodules
SOFT_TISSUE_HU = (-200.0, 300.0)  # fat, muscle and organs; bone and air excluded


# --------------------------------------------------------------------------- per-volume measures


def condition_nodules(cond: np.ndarray, spacing_mm: float, min_mm: float = MIN_NODULE_MM) -> list[dict[str, Any]]:
    """The connected nodules of a condition volume [D,H,W] (values in [0, 1]) whose equivalent-sphere
    diameter is at least ``min_mm``: ``[{"mask": bool [D,H,W], "texture": 1..5, "diameter_mm"}]``."""
    from scipy import ndimage

    from lungsynth.nn.conditioning import texture_map

    textures = texture_map(torch.as_tensor(np.asarray(cond))).numpy()
    labels, n = ndimage.label(textures > 0)
    out = []
    for k in range(1, n + 1):
        mask = labels == k
        diameter = sphere_diameter_mm(int(mask.sum()), spacing_mm)
        if diameter >= min_mm:
            out.append({"mask": mask, "texture": int(np.median(textures[mask])), "diameter_mm": float(diameter)})
    return out


def soft_tissue(hu: np.ndarray, lung: np.ndarray) -> np.ndarray:
    """Body voxels outside the (slightly grown) lung within :data:`SOFT_TISSUE_HU`: bool [D,H,W]."""
    from scipy import ndimage

    from lungsynth.autoencoders.evaluate import body_mask

    outside_lung = ~ndimage.binary_dilation(np.asarray(lung, bool), iterations=2)
    lo, hi = SOFT_TISSUE_HU
    return body_mask(hu) & outside_lung & (hu > lo) & (hu < hi)


def volume_measures(hu: np.ndarray, cond: np.ndarray | None, spacing_mm: float,
                    nodules: Sequence[dict[str, Any]] = (), conditional: bool = True) -> dict[str, Any]:
    """What the gates read of one volume [D,H,W] in HU.

    ``conditional``: the lung is the condition's (its lung and nodules), as a conditional sample and a real
    volume have it; otherwise (``none``) the volume's own classical lung mask, while the nodule contrasts
    are still read at the condition's nodules (a model that ignores the mask should not show them).

    Returns ``{"lung_dice" (NaN unless conditional), "lung_fraction", "lung_hu", "soft_hu",
    "contrasts": [HU per nodule], "nodule_hu": [mean HU inside each nodule], "nodule_textures": [1..5]}``.
    """
    from lungsynth.data.masks import classical_lung_mask

    own = classical_lung_mask(hu, spacing_mm)
    cond_lung = np.asarray(cond) > 0.05 if cond is not None else None  # lung (0.1) or nodule (0.2 .. 1.0)
    lung = cond_lung if conditional and cond_lung is not None else own
    inside = np.any([n["mask"] for n in nodules], axis=0) if nodules else np.zeros_like(lung)
    parenchyma = lung & ~inside
    tissue = soft_tissue(hu, lung)
    shell_lung = cond_lung if cond_lung is not None else own
    return {"lung_dice": dice(own, lung) if conditional and cond_lung is not None else float("nan"),
            "lung_fraction": float(own.mean()),
            "lung_hu": float(hu[parenchyma].mean()) if parenchyma.any() else float("nan"),
            "soft_hu": float(hu[tissue].mean()) if tissue.any() else float("nan"),
            "contrasts": [nodule_contrast(hu, n["mask"], shell_lung, spacing_mm) for n in nodules],
            "nodule_hu": [float(hu[n["mask"]].mean()) for n in nodules],
            "nodule_textures": [int(n["texture"]) for n in nodules]}


# --------------------------------------------------------------------------- the gates of one run


def _mean(values: Iterable[float]) -> float:
    v = [x for x in values if math.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")


def intensity_gates(label: str, gen: Sequence[dict[str, Any]], real: Sequence[dict[str, Any]]) -> list[Gate]:
    """Gate 2: |generated - real| mean HU of the lung and of soft tissue (same conditions, same N)."""
    rows = []
    for key, what in (("lung_hu", "lung"), ("soft_hu", "soft tissue")):
        g, r = _mean(m[key] for m in gen), _mean(m[key] for m in real)
        rows.append(judge(CHAPTER, f"land {label}: mean HU of {what}, |generated - real|", abs(g - r),
                          n=len(gen), n_needed=MIN_SAMPLES, at_most=MAX_HU_GAP,
                          detail=f"generated {g:.0f} HU, real {r:.0f} HU on the same conditions"))
    return rows


def anatomy_gate(label: str, gen: Sequence[dict[str, Any]], real: Sequence[dict[str, Any]],
                 real_fractions: Sequence[float]) -> Gate:
    """Gate 1: lung Dice against the condition (conditional variants), or the lung fraction inside the real
    5th-95th percentile (``none``)."""
    if label != "none":
        return judge(CHAPTER, f"land {label}: lung Dice, sample vs its condition", _mean(m["lung_dice"] for m in gen),
                     n=len(gen), n_needed=MIN_SAMPLES, at_least=MIN_LUNG_DICE,
                     baseline=_mean(m["lung_dice"] for m in real),
                     baseline_name="real volume vs its condition (the measure's ceiling)")
    name = "land none: median lung-volume fraction"
    fractions = [m["lung_fraction"] for m in gen]
    if len(gen) < MIN_SAMPLES or len(real_fractions) < MIN_SAMPLES:
        return judge(CHAPTER, name, None, n=min(len(gen), len(real_fractions)), n_needed=MIN_SAMPLES, at_least=0.0)
    lo, hi = (float(np.percentile(real_fractions, q)) for q in (5, 95))
    value = float(np.median(fractions))
    return Gate(CHAPTER, name, "pass" if lo <= value <= hi else "fail", value,
                threshold=f"in [{lo:.3g}, {hi:.3g}]", baseline=float(np.median(real_fractions)),
                baseline_name="real median (held-out)", n=len(gen), n_needed=MIN_SAMPLES,
                detail="real 5th-95th percentile of the held-out volumes")


def nodule_gate(label: str, gen: Sequence[dict[str, Any]], real: Sequence[dict[str, Any]],
                none: Sequence[dict[str, Any]] | None) -> Gate:
    """Gate 3: share of condition nodules >= 6 mm keeping half their real contrast; baseline: ``none``'s
    samples on the same masks (a model that ignores the mask)."""
    real_c = [c for m in real for c in m["contrasts"]]
    share, n = contrast_share([c for m in gen for c in m["contrasts"]], real_c)
    base = contrast_share([c for m in none for c in m["contrasts"]], real_c)[0] if none else None
    return judge(CHAPTER, f"land {label}: nodules >= {MIN_NODULE_MM:g} mm with >= {MIN_CONTRAST_RATIO:g} x real "
                 f"contrast", share, n=n, n_needed=MIN_NODULES, at_least=MIN_NODULE_SHARE, baseline=base,
                 baseline_name="none on the same masks", detail=f"contrast = mean HU inside - {SHELL_MM:g} mm lung "
                 f"shell; real median {np.median(real_c) if real_c else float('nan'):.0f} HU")


def texture_gate(rows: Sequence[dict[str, Any]], real_pairs: Sequence[tuple[int, float]]) -> Gate:
    """Gate 4: Spearman of requested texture and nodule mean HU over the sweep; baseline: the same
    correlation over the real held-out nodules."""
    rho = spearman([r["texture"] for r in rows], [r["mean_hu_nodule"] for r in rows])
    base = spearman([t for t, _ in real_pairs], [h for _, h in real_pairs])
    return judge(CHAPTER, "land latentmask-texture: Spearman(texture, nodule HU), sweep", rho, n=len(rows),
                 n_needed=5, at_least=MIN_TEXTURE_SPEARMAN, baseline=base,
                 baseline_name="real held-out nodules",
                 detail=f"textures 1-5 on the {SWEEP_CONDITIONS} held-out masks with the largest nodules, same noise")


def nodule_ceiling(reconstructed: Sequence[dict[str, Any]], real: Sequence[dict[str, Any]]) -> Gate:
    """Gate 3's measure on the vae3d reconstructions of the same real volumes: the share of nodules a latent
    variant can keep at best, since every sample is decoded by this autoencoder (info, no threshold)."""
    real_c = [c for m in real for c in m["contrasts"]]
    share, n = contrast_share([c for m in reconstructed for c in m["contrasts"]], real_c)
    return info(CHAPTER, f"land: vae3d ceiling: nodules >= {MIN_NODULE_MM:g} mm with >= {MIN_CONTRAST_RATIO:g} x "
                f"real contrast", share, n=n, detail="the real volumes encoded and decoded: what every latent "
                f"variant's decoder can at best keep (gate 3 needs {MIN_NODULE_SHARE:g})")


def distribution_gate(label: str, score: Any, baselines: Any) -> Gate:
    """Gate 5: KID <= a tenth of the noise baseline's, with the floor and the vae3d ceiling beside it."""
    ceiling = f", vae3d ceiling {baselines.ceiling.value:.4g}" if baselines.ceiling is not None else ""
    return judge(CHAPTER, f"land {label}: KID vs held-out half", score.value, n=baselines.n, n_needed=MIN_SAMPLES,
                 factor=MAX_KID_SHARE, baseline=baselines.noise.value, baseline_name="shuffled-voxel noise",
                 detail=f"real-vs-real floor {baselines.floor.value:.4g}{ceiling}; features {baselines.network}")


# --------------------------------------------------------------------------- measuring a run


def _chunks(indices: Sequence[int], size: int) -> list[tuple[int, list[int]]]:
    """(position of the first item, items) of ``indices`` cut into runs of ``size``."""
    return [(i, list(indices[i:i + size])) for i in range(0, len(indices), size)]


def _features(vols: torch.Tensor, network: str) -> tuple[np.ndarray, str]:
    from lungsynth.eval.features import extract_features

    return extract_features(vols.numpy(), network, "unit")


def _chunk_measures(cfg: Any, vols: torch.Tensor, conds: torch.Tensor, conditional: bool = True) -> list[dict[str, Any]]:
    """:func:`volume_measures` of each volume [n,1,S,S,S] in [0, 1] with its condition [n,1,S,S,S]."""
    from lungsynth.data.preprocess import unit_to_hu

    spacing = float(cfg.data.spacing_3d_mm)
    hu = unit_to_hu(vols, cfg.data.hu_min, cfg.data.hu_max).numpy()
    return [volume_measures(v[0], c[0], spacing, condition_nodules(c[0], spacing), conditional)
            for v, c in zip(hu, conds.numpy())]


def _measure_set(cfg: Any, held: Any, indices: Sequence[int], volumes: Iterable[torch.Tensor], network: str | None,
                 conditional: bool) -> tuple[list[dict[str, Any]], np.ndarray | None, str | None]:
    """Measures and features of volumes [n,1,S,S,S] in [0, 1] (chunks, in the order of ``indices``, whose
    conditions they belong to): (measures per volume, features [N, F] or None without ``network``, name)."""
    measures, feats, name, pos = [], [], network, 0
    for vols in volumes:
        measures += _chunk_measures(cfg, vols, held.chunk(indices[pos:pos + len(vols)], "cond"), conditional)
        if network:
            f, name = _features(vols, network)
            feats.append(f)
        pos += len(vols)
    return measures, np.concatenate(feats) if feats else None, name


def _real_chunks(held: Any, indices: Sequence[int], size: int) -> Iterable[torch.Tensor]:
    return (held.chunk(part, "ct") for _, part in _chunks(indices, size))


def _sample_chunks(model: Any, held: Any, indices: Sequence[int], size: int, seed: int) -> Iterable[torch.Tensor]:

    for first, part in _chunks(indices, size):
        c = None if model.variant == "none" else held.chunk(part, "cond")
        yield sample(model, c, len(part), seed=seed, batch=len(part), first_index=first)["ct"]


def _baselines(cfg: Any, held: Any, a: Sequence[int], r: Sequence[int], size: int, network: str,
               vae: Any) -> tuple[Any, list[dict[str, Any]]]:
    """Floor, noise and vae3d ceiling at n = len(a) against half ``r``, streamed (eval.baselines' forms), and
    the gate measures of the vae3d reconstructions of half ``a`` (what any latent variant can at best keep)."""
    from lungsynth.autoencoders.evaluate import body_mask
    from lungsynth.data.preprocess import unit_to_hu
    from lungsynth.eval.baselines import Baselines, compare, shuffle_in_body

    ref = np.concatenate([_features(v, network)[0] for v in _real_chunks(held, r, size)])
    real, noise, recon, name, rec_measures = [], [], [], network, []
    for _, part in _chunks(a, size):
        vols = held.chunk(part, "ct")
        hu = unit_to_hu(vols, cfg.data.hu_min, cfg.data.hu_max).numpy()[:, 0]
        conds = held.chunk(part, "cond")
        # the condition's lungs are named as body: body_mask's slice-wise hole filling missed them in 6 of the
        # 8 course gate volumes (2-14% of lung voxels inside), so the "noise" kept their lungs intact
        bodies = np.stack([body_mask(v, c > 0.05) for v, c in zip(hu, conds[:, 0].numpy())])
        shuffled = torch.as_tensor(shuffle_in_body(vols[:, 0].numpy(), bodies, seed=int(part[0])))[:, None]
        f, name = _features(vols, network)
        real.append(f)
        noise.append(_features(shuffled, network)[0])
        with torch.no_grad():
            dev = next(vae.parameters()).device
            rec = vae.reconstruct(vols.to(dev), roi_size=cfg.autoencoders.sliding_roi).float().cpu()
        rec = rec.clamp(0, 1)
        recon.append(_features(rec, network)[0])
        rec_measures += _chunk_measures(cfg, rec, conds)
    metric = lambda f: compare(ref, np.concatenate(f), network=name)  # noqa: E731
    return Baselines("volume", len(a), name, metric(real), metric(noise), metric(recon), ref), rec_measures


def measure(cfg: Any, models: dict[str, Any], *, n: int | None = None, seed: int = 0) -> list[Gate]:
    """Every gate of the trained ``models`` (variant -> loaded LandModel) on this profile's held-out data."""
    from lungsynth.eval.baselines import halves
    from lungsynth.methods.land.sample import texture_sweep
    from lungsynth.methods.land.train import largest_nodule_indices

    held = HeldoutVolumes(cfg)
    n = int(n or cfg.land.n_gate_samples)
    size = max(1, int(cfg.land.eval_batch))
    network = cfg.evaluation.feature_network
    a, r = (list(map(int, h)) for h in halves(len(held), seed))
    a = a[:n]
    if len(a) < n or len(r) < 2:
        return [judge(CHAPTER, "land: held-out volumes for the gates", len(held), n=len(held), n_needed=2 * n,
                      at_least=2 * n, detail=f"halves of {len(a)} and {len(r)}; prepare more scans")]
    real, _, _ = _measure_set(cfg, held, a, _real_chunks(held, a, size), None, True)
    others, _, _ = _measure_set(cfg, held, r, _real_chunks(held, r, size), None, True)
    fractions = [m["lung_fraction"] for m in real + others]
    vae = next(iter(models.values())).vae
    base, reconstructed = _baselines(cfg, held, a, r, size, network, vae)
    measured = {v: _measure_set(cfg, held, a, _sample_chunks(m, held, a, size, seed), network, v != "none")
                for v, m in models.items()}
    none = measured["none"][0] if "none" in measured else None
    rows: list[Gate] = []
    for variant, (gen, feats, _) in measured.items():
        rows.append(anatomy_gate(variant, gen, real, fractions))
        rows += intensity_gates(variant, gen, real)
        if variant != "none":
            rows.append(nodule_gate(variant, gen, real, none))
        rows.append(distribution_gate(variant, base.score(feats), base))
    if "latentmask-texture" in models:
        sweep = [row for i in largest_nodule_indices(held, SWEEP_CONDITIONS)
                 for row in texture_sweep(models["latentmask-texture"], held.chunk([i], "cond"), seed=seed)["rows"]]
        real_pairs = [(tex, h) for m in real for tex, h in zip(m["nodule_textures"], m["nodule_hu"])]
        rows.append(texture_gate(sweep, real_pairs))
    rows.append(info(CHAPTER, "land: real-vs-real KID floor (held-out halves)", base.floor.value, n=base.n,
                     detail="what a perfect generator scores at this N"))
    rows.append(nodule_ceiling(reconstructed, real))
    return rows


def quality_gates(cfg: Any) -> list[Gate]:
    """Chapter 03's gates on the profile's trained variants (an untrained one is listed with its command);
    measured once per set of checkpoints and data, then read from ``runs/<profile>/03_land_gates.json``."""
    from lungsynth import paths
    from lungsynth.autoencoders.model import default_run_dir as ae_run_dir
    from lungsynth.gates import cached, file_digest
    from lungsynth.methods.land.train import _is_done

    rows: list[Gate] = []
    trained: dict[str, Path] = {}
    for variant in VARIANTS:
        run = default_run_dir(cfg, variant, create=False)
        command = f"lungsynth land train --variant {variant} --profile {cfg.profile}"
        if not (run / "final.pt").is_file():  # checked first: listing an untrained chapter reads no data
            rows.append(not_trained(CHAPTER, f"land {variant}", command))
            continue
        try:
            done = _is_done(run, cfg, variant)
            fingerprint.refuse_overlap(run, prepared_root(cfg), ("test", "val"), what=f"LAND {variant} run")
        except (ValueError, FileNotFoundError) as exc:  # another architecture, data or overlapping patients
            rows.append(not_trained(CHAPTER, f"land {variant}",
                                    f"{command} --fresh  ({str(exc).splitlines()[0][:120]})"))
            continue
        if not done:
            rows.append(not_trained(CHAPTER, f"land {variant}", command))
            continue
        trained[variant] = run
    if not trained:
        return rows
    autoencoders = {k: ae_run_dir(k, cfg, create=False) / "final.pt" for k in ("vae3d", "maskvae")}
    key = {"gates": GATES_VERSION, "weights": {v: file_digest(r / "final.pt") for v, r in trained.items()},
           "autoencoders": {k: file_digest(p) for k, p in autoencoders.items() if p.is_file()},
           "data": fingerprint.load(prepared_root(cfg))["id"], "n": int(cfg.land.n_gate_samples),
           "sampler": cfg.land.sampler, "steps": int(cfg.land.ddim_steps), "network": cfg.evaluation.feature_network}

    def compute() -> list[Gate]:
        return measure(cfg, {v: load(cfg, v, run, train_if_missing=False) for v, run in trained.items()})

    return rows + cached(paths.runs_dir(cfg.profile) / GATES_FILE, key, compute)
