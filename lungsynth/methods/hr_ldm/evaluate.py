"""The chapter's table and gates: HR-LDM vs the MAISI-DDPM ablation (no histogram loss) on held-out nodules.

Each held-out nodule is regenerated where it was: its own mask, subtype and HU histogram are the conditions,
and the background is the same cube of the scan's healthy twin (phantom data; real LIDC data regenerates in the
scan itself). The generated region is pasted into the background as :func:`inpaint_volume` pastes it. Table 1
as the paper: FID, KID and MMD on the axial, sagittal and coronal planes through the lesion and their average,
with real and generated crops from **disjoint scans** (:func:`disjoint_halves`: the nodules regenerated in one half
of the held-out scans against the real nodules of the other, then the other way round, the two averaged), so a
generated crop is never scored against the real crop of its own background; beside them the paired measures on
the same nodules (per-subtype JSD of pooled lesion HU histograms inside the same masks, |delta HU| outside).
:func:`quality_gates` judges subtype fidelity, the regulariser, the background and placement.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from lungsynth.data import fingerprint
from lungsynth.data.datasets import data_source, prepared_root, training_stamp
from lungsynth.methods.hr_ldm.model import SUBTYPES, hu_histogram, js_divergence_np, unit_to_hu
from lungsynth.methods.hr_ldm.sample import HrLdm, inpaint_crops, latent_region, load
from lungsynth.methods.hr_ldm.train import ensure_trained, train_crops

EVAL_SPLITS = ("val", "test")  # held-out nodules only
PLANES = ("axial", "sagittal", "coronal")


def _stack(items: Sequence[Mapping[str, Any]], key: str) -> torch.Tensor:
    return torch.stack([torch.as_tensor(it[key]).float() for it in items])


def pick_per_subtype(items: Sequence[Mapping[str, Any]], n_per_subtype: int) -> tuple[list[int], dict[str, int]]:
    """Indices of up to ``n_per_subtype`` distinct items of each subtype (in order, never repeated) and, per
    subtype, how many exist: a rare subtype enters with what there is, and the table says so."""
    sub = np.array([int(it["subtype_id"]) for it in items])
    picked: list[int] = []
    available: dict[str, int] = {}
    for y, name in enumerate(SUBTYPES):
        idx = np.flatnonzero(sub == y)
        available[name] = int(idx.size)
        picked += idx[:n_per_subtype].tolist()
    return picked, available


@torch.no_grad()
def generate_for_eval(model: HrLdm, items: Sequence[Mapping[str, Any]], n_per_subtype: int, seed: int = 0,
                      steps: int | None = None, batch: int = 8) -> dict[str, Any]:
    """Regenerate held-out nodules in place, up to ``n_per_subtype`` distinct ones per subtype.

    The background is the item's ``healthy`` cube when it has one (else its ``ct``); the conditions are its
    mask, subtype and real HU histogram; the generated latent region is pasted into the background.
    Returns arrays in HU [N, C, C, C]: ``real`` (the real nodule crop), ``fake``, ``background``, ``recon``
    (the background through the autoencoder alone), ``mask``, ``region`` (bool), ``subtype`` [N], ``scan_id`` [N]
    (the scan each crop was cut from, "" when the item does not say), and ``available`` (held-out nodules per
    subtype) and ``background_kind``.
    """
    cfg = model.cfg
    items = [it for it in items if float(torch.as_tensor(it["hrmask"])[0].sum()) > 0]
    if not items:
        raise ValueError("no evaluation crop has a non-empty nodule mask")
    picked, available = pick_per_subtype(items, int(n_per_subtype))
    healthy = all("healthy" in items[i] for i in picked)
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("real", "fake", "background", "recon", "mask", "region",
                                                         "subtype")}
    vae = model.vae
    for i in range(0, len(picked), batch):
        chunk = [items[k] for k in picked[i:i + batch]]
        ct, hr = _stack(chunk, "ct"), _stack(chunk, "hrmask")
        bg = _stack(chunk, "healthy") if healthy else ct
        y = torch.tensor([int(it["subtype_id"]) for it in chunk])
        hist = np.stack([hu_histogram(unit_to_hu(ct[k, 0], cfg), hr[k, 0], cfg.hr_ldm.hist_bins,
                                      tuple(cfg.hr_ldm.hist_range_hu)) for k in range(len(chunk))])
        res = inpaint_crops(model, bg, hr, y, hist, steps=steps, seed=seed + i)
        region = torch.from_numpy(np.stack([latent_region(h.numpy(), vae.downsample) for h in hr]))[:, None]
        fake = torch.where(region, res["ct"].cpu(), bg)
        recon = vae.decode_latent(vae.encode_latent(bg.to(model.device), sample=False)).cpu()
        for key, arr in (("real", ct), ("fake", fake), ("background", bg), ("recon", recon)):
            out[key].append(unit_to_hu(arr[:, 0], cfg).numpy())
        out["mask"].append(hr[:, 0].numpy() > 0)
        out["region"].append(region[:, 0].numpy())
        out["subtype"].append(y.numpy())
    gen: dict[str, Any] = {k: np.concatenate(v) for k, v in out.items()}
    gen["scan_id"] = np.array([str(items[k].get("scan_id", "")) for k in picked])
    gen["available"] = available
    gen["background_kind"] = "healthy twin" if healthy else "the scan itself (real LIDC: no healthy twin)"
    return gen


def median_hu(gen: Mapping[str, np.ndarray], key: str) -> dict[str, float]:
    """Median HU of the pooled nodule voxels of each subtype in ``gen[key]`` (``real`` or ``fake``)."""
    out = {}
    for y, name in enumerate(SUBTYPES):
        keep = gen["subtype"] == y
        out[name] = float(np.median(gen[key][keep][gen["mask"][keep]])) if keep.any() else float("nan")
    return out


def subtype_jsd(gen: Mapping[str, np.ndarray], cfg: Any, key: str = "fake") -> dict[str, float]:
    """Per-subtype JSD between the pooled HU histograms of real nodules and ``gen[key]`` inside the same masks."""
    bins, rng = cfg.hr_ldm.hist_bins, tuple(cfg.hr_ldm.hist_range_hu)
    out = {}
    for y, name in enumerate(SUBTYPES):
        keep = gen["subtype"] == y
        if not keep.any():
            out[name] = float("nan")
            continue
        out[name] = js_divergence_np(hu_histogram(gen["real"][keep], gen["mask"][keep], bins, rng),
                                     hu_histogram(gen[key][keep], gen["mask"][keep], bins, rng))
    return out


def ring_change(gen: Mapping[str, np.ndarray], key: str) -> tuple[float, int]:
    """Mean over the items of the mean |gen[key] - background| (HU) in the ring: the generated region (the latent
    region M upsampled) minus the nodule mask. Returns (value, items with a ring)."""
    ring = gen["region"] & ~gen["mask"]
    keep = [k for k in range(len(ring)) if ring[k].any()]
    if not keep:
        return float("nan"), 0
    return float(np.mean([np.abs(gen[key][k] - gen["background"][k])[ring[k]].mean() for k in keep])), len(keep)


def mean_paste(gen: Mapping[str, np.ndarray], mean_hu: Mapping[int, float]) -> np.ndarray:
    """The baseline of gate 2: each subtype's mean HU pasted into the same masks on the same backgrounds."""
    fill = np.array([mean_hu[int(y)] for y in gen["subtype"]], np.float32)[:, None, None, None]
    return np.where(gen["mask"], fill, gen["background"]).astype(np.float32)


def disjoint_halves(scan_ids: Sequence[str], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the items in two halves of their scans (``eval.baselines.halves`` over the distinct scans, so all
    of one scan's nodules fall on one side), each cut to the smaller half's count (equal N, no duplicates).
    ValueError when the items come from fewer than 2 scans (or do not say which)."""
    from lungsynth.eval.baselines import halves

    ids = np.asarray([str(s) for s in scan_ids])
    scans = sorted(set(ids.tolist()) - {""})
    if len(scans) < 2 or "" in set(ids.tolist()):
        raise ValueError(f"a disjoint real reference needs nodules from at least 2 known scans, got {len(scans)}; "
                         f"prepare more held-out scans (cfg.data.n_scans)")
    a, b = halves(len(scans), seed)
    first, second = (np.flatnonzero(np.isin(ids, [scans[i] for i in part])) for part in (a, b))
    k = min(len(first), len(second))
    return first[:k], second[:k]


def metrics_for(cfg: Any, gen: Mapping[str, Any], network: str | None = None) -> dict[str, Any]:
    """Table 1's row: FID/KID/MMD per plane (axial, sagittal, coronal) and their average, each the mean of the two
    cross-fitted directions of :func:`disjoint_halves` (regenerated nodules of one half of the scans against the
    real nodules of the other), and the paired measures: the per-subtype JSD (bits) of pooled lesion HU histograms
    and the mean |delta HU| outside the nodule mask. Distribution metrics are NaN below 2 crops a half."""
    from lungsynth.eval.distribution import evaluate_distribution
    from lungsynth.eval.features import features_25d

    row: dict[str, Any] = {f"jsd_{k}": v for k, v in subtype_jsd(gen, cfg).items()}
    row["jsd_mean"] = float(np.nanmean([row[f"jsd_{k}"] for k in SUBTYPES]))
    net = network or ("astra" if cfg.evaluation.feature_network.startswith("astra") else "slicenet2d")
    first, second = disjoint_halves(gen["scan_id"], int(cfg.seed))
    fr, name = features_25d(gen["real"], "hu", network=net)
    ff, _ = features_25d(gen["fake"], "hu", network=net)
    directions = []  # (generated half, real half) both ways round; none below 2 crops a half
    if len(first) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # n < 50 is flagged in the row instead
            directions = [{p: evaluate_distribution(fr[p][real], ff[p][fake], cfg, network=name) for p in PLANES}
                          for fake, real in ((first, second), (second, first))]
    for metric in ("fid", "kid", "mmd"):
        for p in PLANES:
            row[f"{metric}_{p}"] = float(np.mean([d[p][metric].value for d in directions])) if directions else \
                float("nan")
        row[metric] = float(np.mean([row[f"{metric}_{p}"] for p in PLANES]))
    row["delta_hu_outside"] = float(np.abs(gen["fake"] - gen["background"])[~gen["mask"]].mean())
    row["n"] = int(len(gen["fake"]))
    row["n_per_half"] = int(len(first))
    row["network"] = name
    return row


def evaluate(cfg: Any, models: Mapping[str, HrLdm] | None = None, *, items: Sequence[Mapping[str, Any]] | None = None,
             n_per_subtype: int | None = None, network: str | None = None, seed: int = 0) -> dict[str, Any]:
    """The chapter's Table 1: HR-LDM vs MAISI-DDPM (no histogram loss) on held-out nodules.

    Args:
        models: ``{"HR-LDM": model, "MAISI-DDPM (no hist loss)": model}`` (default: both, ensure_trained).
        items: evaluation crops (default the prepared val + test crops).
        n_per_subtype: regenerated nodules per subtype at most (default ``cfg.hr_ldm.eval_per_subtype``); a
            subtype with fewer held-out nodules enters with all of them, never repeated.
    Returns:
        ``{"rows": [{"method", "fid_axial", ..., "fid", "kid", "mmd", "jsd_<subtype>", "jsd_mean",
        "delta_hu_outside", "n", "network", "source"}], "generated": {method: arrays}, "available": {...}}``.
    """
    if models is None:
        models = load_both(cfg)
    if items is None:
        items = eval_items(cfg)
    n = int(n_per_subtype or cfg.hr_ldm.eval_per_subtype)
    rows, generated = [], {}
    for name, model in models.items():
        gen = generate_for_eval(model, items, n, seed=seed)
        generated[name] = gen
        rows.append({"method": name, **metrics_for(cfg, gen, network), "source": data_source(cfg)})
    first = next(iter(generated.values()))
    return {"rows": rows, "generated": generated, "available": first["available"],
            "background": first["background_kind"]}


def load_both(cfg: Any) -> dict[str, HrLdm]:
    """HR-LDM and its ablation, trained when missing and refused when trained on a held-out patient."""
    runs = {"HR-LDM": (ensure_trained(cfg, True), True), "MAISI-DDPM (no hist loss)": (ensure_trained(cfg, False), False)}
    for name, (run_dir, _) in runs.items():
        fingerprint.refuse_overlap(run_dir, prepared_root(cfg), EVAL_SPLITS, what=f"{name} run")
    return {name: load(cfg, run_dir, hist) for name, (run_dir, hist) in runs.items()}


def _with_nodule(ds: Any) -> list[Mapping[str, Any]]:
    items = [ds[i] for i in range(len(ds))]
    return [it for it in items if float(torch.as_tensor(it["hrmask"])[0].sum()) > 0]


def eval_items(cfg: Any) -> list[Mapping[str, Any]]:
    """Held-out 6-30 mm nodule crops (``hr_ldm.size_range_mm``) with a non-empty mask: val + test (never a
    training patient's)."""
    items: list[Mapping[str, Any]] = []
    for split in EVAL_SPLITS:
        items += _with_nodule(train_crops(cfg, split))
    if not items:
        raise ValueError(f"the {'/'.join(EVAL_SPLITS)} splits of profile {cfg.profile} hold no nodule crop in "
                         f"{tuple(cfg.hr_ldm.size_range_mm)} mm; prepare more scans (cfg.data.n_scans)")
    return items


# --------------------------------------------------------------------------- quality gates

CHAPTER = "05"
GATES_VERSION = 2  # 2: v target and twin context retrain; the real nodule's own ring change
GATES_FILE = "05_hr_ldm_gates.json"
MEDIAN_HU_TOLERANCE = 150.0  # gate 1: HU; a third of the gap between solid (~0) and ground-glass (~-600) medians
MIN_PER_SUBTYPE = 3  # fewer regenerated nodules of a subtype cannot judge it


def placement_trials(model: HrLdm, cfg: Any, n: int, seed: int = 0, steps: int | None = None) -> list[dict[str, Any]]:
    """``n`` nodules inpainted into held-out scans *with* their nodules (the real-LIDC path: ``exclude`` = their
    label map), ``hr_ldm.subpleural_share`` of them in the rim. Each trial measures, from the geometry alone:
    whether the centre is in the lung, whether it is in the rim, the changed voxels on an existing nodule,
    and the largest |change| outside the changed region."""
    from scipy import ndimage

    from lungsynth.data.datasets import VolumeDataset
    from lungsynth.methods.hr_ldm.sample import NoduleLibrary, inpaint_volume

    ds = VolumeDataset(cfg, "test", keys=("ct", "lung", "label"))
    library = NoduleLibrary.from_prepared(cfg, "train")
    rng = np.random.default_rng(seed)
    rim = set(rng.permutation(n)[:int(round(cfg.hr_ldm.subpleural_share * n))].tolist())
    spacing = float(cfg.data.spacing_3d_mm)
    trials = []
    for k in range(n):
        item = ds[k % len(ds)]
        ct, lung, label = unit_to_hu(item["ct"][0].numpy(), cfg), item["lung"][0].numpy() > 0, item["label"][0].numpy()
        res = inpaint_volume(model, ct, lung, int(rng.integers(3)), spacing_mm=spacing, library=library,
                             subpleural=k in rim, exclude=label > 0, seed=seed + k, steps=steps)
        c = tuple(res.centre)
        margin = (res.extent_mm / 2 + float(cfg.hr_ldm.lung_erosion_mm)) / spacing  # as placement drew it
        depth = float(ndimage.distance_transform_edt(lung)[c])
        changed = np.abs(res.ct_hu - ct)
        trials.append({"in_lung": bool(lung[c]), "in_rim": bool(lung[c] and depth <= margin),
                       "requested_rim": k in rim, "overlap_voxels": int(((res.region > 0) & (label > 0)).sum()),
                       "max_change_outside": float(changed[res.region == 0].max())})
    return trials


def measure_gates(cfg: Any, models: Mapping[str, HrLdm]) -> list[Any]:
    """Chapter 05's gates (module docstring) on held-out nodules of this run; see :func:`quality_gates`."""
    from lungsynth.gates import info, judge

    hist_model, base_model = models["HR-LDM"], models["MAISI-DDPM (no hist loss)"]
    items = eval_items(cfg)
    n = int(cfg.hr_ldm.eval_per_subtype)
    gen = generate_for_eval(hist_model, items, n)
    base = generate_for_eval(base_model, items, n)
    counts = {name: int((gen["subtype"] == y).sum()) for y, name in enumerate(SUBTYPES)}
    n_min = min(counts.values())
    rows = []
    # 1. subtype fidelity
    real_med, fake_med = median_hu(gen, "real"), median_hu(gen, "fake")
    worst = max(SUBTYPES, key=lambda s: abs(fake_med[s] - real_med[s]) if np.isfinite(fake_med[s]) else np.inf)
    rows.append(judge(CHAPTER, "subtype fidelity: worst |median HU - real| (HU)", abs(fake_med[worst] - real_med[worst]),
                      n=n_min, n_needed=MIN_PER_SUBTYPE, at_most=MEDIAN_HU_TOLERANCE,
                      detail="median HU inside the regenerated nodules vs the real ones, by subtype: " + ", ".join(
                          f"{s} {fake_med[s]:.0f} vs {real_med[s]:.0f}" for s in SUBTYPES)
                      + f"; worst: {worst}; background: {gen['background_kind']}"))
    gaps = (fake_med["part-solid"] - fake_med["ground-glass"], fake_med["solid"] - fake_med["part-solid"])
    rows.append(judge(CHAPTER, "subtype order ground-glass < part-solid < solid: smallest gap (HU)", float(min(gaps)),
                      n=n_min, n_needed=MIN_PER_SUBTYPE, at_least=0.0,
                      detail=f"generated medians: part-solid - ground-glass {gaps[0]:.0f} HU, solid - part-solid "
                             f"{gaps[1]:.0f} HU (real: {real_med['part-solid'] - real_med['ground-glass']:.0f}, "
                             f"{real_med['solid'] - real_med['part-solid']:.0f})"))
    # 2. the regulariser helps
    library_means = {y: float(np.mean(gen["real"][gen["subtype"] == y][gen["mask"][gen["subtype"] == y]]))
                     for y in range(3) if (gen["subtype"] == y).any()}
    train_means = _train_mean_hu(cfg) or library_means
    paste = {**gen, "paste": mean_paste(gen, train_means)}
    j_hist, j_base, j_paste = subtype_jsd(gen, cfg), subtype_jsd(base, cfg), subtype_jsd(paste, cfg, "paste")
    for s in SUBTYPES:
        rows.append(judge(CHAPTER, f"histogram loss helps: JSD to real {s} nodules", j_hist[s], n=counts[s],
                          n_needed=MIN_PER_SUBTYPE, factor=1.0, baseline=min(j_base[s], j_paste[s]),
                          baseline_name="min(no-hist ablation, mean-HU paste)",
                          detail=f"HR-LDM {j_hist[s]:.3f}, no-hist ablation {j_base[s]:.3f}, the training {s} "
                                 f"mean HU pasted {j_paste[s]:.3f}"))
    # 3. background kept
    # what is pasted besides the nodule: the latent voxels it touches
    (change, n_ring), (recon, _), (own, _) = (ring_change(gen, k) for k in ("fake", "recon", "real"))
    rows.append(judge(CHAPTER, "background kept: mean |change| in the pasted ring around the nodule (HU)", change,
                      n=n_ring, n_needed=MIN_PER_SUBTYPE, factor=1.0, baseline=recon,
                      baseline_name="the autoencoder's reconstruction error on the same voxels",
                      detail="the ring is the latent region M upsampled, minus the nodule: a generated nodule that "
                             "bleeds past its mask changes it more than decoding alone"))
    rows.append(info(CHAPTER, "background kept: the real nodule's own change in that ring (HU)", own, n=n_ring,
                     baseline=recon, baseline_name="the autoencoder's reconstruction error on the same voxels",
                     detail="|real crop - healthy twin| in the same ring: what the nodule itself changes past its "
                            "mask (its blurred edge); on real LIDC scans, with no twin, 0"))
    trials = placement_trials(hist_model, cfg, int(cfg.hr_ldm.n_placement_trials))
    nt = len(trials)
    rows.append(judge(CHAPTER, "background kept: largest |change| outside the pasted region (HU)",
                      max(t["max_change_outside"] for t in trials), n=nt, n_needed=1, at_most=0.0,
                      detail="whole held-out volumes"))
    # 4. placement
    rows.append(judge(CHAPTER, "placement: centres inside the lung", float(np.mean([t["in_lung"] for t in trials])),
                      n=nt, n_needed=4, at_least=1.0, detail="held-out scans with their own nodules"))
    rows.append(judge(CHAPTER, "placement: changed voxels on an existing nodule",
                      float(sum(t["overlap_voxels"] for t in trials)), n=nt, n_needed=4, at_most=0.0,
                      detail="inpainted beside the scans' real nodules (exclude = their label map)"))
    requested = float(cfg.hr_ldm.subpleural_share)
    measured = float(np.mean([t["in_rim"] for t in trials]))
    rows.append(judge(CHAPTER, "placement: |sub-pleural share - requested|", abs(measured - requested), n=nt,
                      n_needed=4, at_most=0.5 / nt + 1e-9,
                      detail=f"measured {measured:.2f} of centres in the rim (by their depth in the lung), "
                             f"requested {requested:.2f}; the threshold is the rounding of {nt} trials"))
    return rows


def _train_mean_hu(cfg: Any) -> dict[int, float]:
    """Each subtype's mean nodule HU over the training crops (the mean-HU paste baseline's value)."""
    sums, counts = np.zeros(3), np.zeros(3)
    for it in _with_nodule(train_crops(cfg, "train")):
        hu = unit_to_hu(torch.as_tensor(it["ct"]).float()[0], cfg).numpy()
        m = torch.as_tensor(it["hrmask"])[0].numpy() > 0
        y = int(it["subtype_id"])
        sums[y] += hu[m].sum()
        counts[y] += m.sum()
    return {y: float(sums[y] / counts[y]) for y in range(3) if counts[y] > 0}


def quality_gates(cfg: Any) -> list[Any]:
    """Chapter 05's gates on the profile's trained HR-LDM and ablation (untrained: the rows name the commands);
    measured once per pair of checkpoints and data, then read from ``runs/<profile>/05_hr_ldm_gates.json``."""
    from lungsynth import paths
    from lungsynth.autoencoders.model import default_run_dir as ae_run_dir
    from lungsynth.engine import FINAL_NAME
    from lungsynth.gates import cached, file_digest, not_trained
    from lungsynth.methods.hr_ldm.train import default_run_dir, rebuild_command

    runs = {"HR-LDM": True, "MAISI-DDPM (no hist loss)": False}
    missing = []
    for name, hist in runs.items():
        run = default_run_dir(cfg, hist)
        if not (run / FINAL_NAME).is_file():
            missing.append(not_trained(CHAPTER, name, rebuild_command(cfg, hist).replace(" --fresh", "")))
    if missing:
        return missing
    try:
        models = {}
        for name, hist in runs.items():
            run = default_run_dir(cfg, hist)
            if not fingerprint.check_run(run, training_stamp(cfg), rebuild_command(cfg, hist)):
                raise ValueError(f"{run} has no data stamp")
            fingerprint.refuse_overlap(run, prepared_root(cfg), EVAL_SPLITS, what=f"{name} run")
            models[name] = load(cfg, run, hist)
    except (ValueError, FileNotFoundError) as exc:
        return [not_trained(CHAPTER, "HR-LDM", f"{rebuild_command(cfg, True)}  ({str(exc).splitlines()[0][:120]})")]
    key = {"gates": GATES_VERSION, "data": fingerprint.load(prepared_root(cfg))["id"],
           "weights": {name: file_digest(m.run_dir / FINAL_NAME) for name, m in models.items()},
           "autoencoder": file_digest(ae_run_dir("vae3d", cfg, create=False) / FINAL_NAME),
           "n": int(cfg.hr_ldm.eval_per_subtype), "trials": int(cfg.hr_ldm.n_placement_trials),
           "steps": int(cfg.hr_ldm.ddim_steps)}
    return cached(paths.runs_dir(cfg.profile) / GATES_FILE, key, lambda: measure_gates(cfg, models))
