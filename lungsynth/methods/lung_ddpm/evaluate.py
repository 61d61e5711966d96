"""Lung-DDPM's table: the metrics (FID, MMD, masked MSE, seam ratio) and the ablation rows of the paper's Table IV."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Sequence

from lungsynth.data import fingerprint
from lungsynth.data.datasets import data_source, prepared_root
from lungsynth.methods.lung_ddpm.model import make_layout, voxel_mm
from lungsynth.methods.lung_ddpm.sample import LungDDPM, generate, load

if TYPE_CHECKING:
    import torch

    from lungsynth.config import Config

#: the ablation rows of Table IV: row name -> (training variant, AAS at sampling)
ABLATIONS: dict[str, tuple[str, bool]] = {
    "Lung-DDPM (AAS)": ("layout", True),
    "w/o AAS": ("layout", False),
    "w/o lung layout": ("no_lung_layout", True),
}


# --------------------------------------------------------------------------- metrics


def boundary_shell(mask: "torch.Tensor", width: int = 1) -> "torch.Tensor":
    """Voxels within ``width`` of the mask boundary, on both sides: dilate(m) and not erode(m).

    Args: mask [B, 1, *S] (bool or {0, 1}). Returns: bool [B, 1, *S].
    """
    import torch.nn.functional as F

    m = (mask > 0.5).float() if mask.dtype != __import__("torch").bool else mask.float()
    k = 2 * int(width) + 1
    pool = F.max_pool3d if m.ndim == 5 else F.max_pool2d
    dilated = pool(m, k, stride=1, padding=width) > 0.5
    eroded = pool(1.0 - m, k, stride=1, padding=width) < 0.5
    return dilated & ~eroded


def gradient_magnitude(x: "torch.Tensor") -> "torch.Tensor":
    """|grad x| by central differences (one-sided at the borders); [B, 1, *S] -> [B, 1, *S]."""
    import torch

    grads = torch.gradient(x.float(), dim=tuple(range(2, x.ndim)))
    return torch.sqrt(sum(g * g for g in grads))


def seam_ratio(sample_: "torch.Tensor", real: "torch.Tensor", mask: "torch.Tensor", width: int = 1,
               eps: float = 1e-8) -> "torch.Tensor":
    """Seam measure per volume: mean |grad| of the sample over the mean |grad| of the real volume, both
    in the shell of ``width`` voxels on each side of the lung boundary. 1 means edges as strong as
    the real anatomy's; above 1, a visible seam (or noise) at the boundary.

    Args: sample_, real [B, 1, *S]; mask [B or 1, 1, *S] (the lung, ``m_l``). Returns: float64 [B].
    """

    if sample_.shape != real.shape:
        raise ValueError(f"sample {tuple(sample_.shape)} and real {tuple(real.shape)} differ in shape")
    shell = boundary_shell(mask, width).expand_as(sample_).float()
    n = shell.sum(dim=tuple(range(1, shell.ndim)))
    if bool((n == 0).any()):
        raise ValueError("seam_ratio: the lung mask has no boundary in some volume (empty or full mask)")
    dims = tuple(range(1, shell.ndim))
    gs = (gradient_magnitude(sample_) * shell).sum(dim=dims) / n
    gr = (gradient_magnitude(real) * shell).sum(dim=dims) / n
    return (gs / gr.clamp_min(eps)).double()


def eval_volumes(cfg: "Config", split: str | None = None, n: int | None = None) -> dict[str, Any]:
    """Paired real volumes for evaluation: ``{"ct", "layout" [N, 1, S, S, S], "scan_id": [...]}``."""
    import torch

    from lungsynth.data.datasets import VolumeDataset, ensure_prepared

    split = split or cfg.lung_ddpm.eval_split
    ensure_prepared(cfg)
    ds = VolumeDataset(cfg, split, size=cfg.data.size_ddpm, keys=("ct", "lung", "label"))
    count = len(ds) if n is None else min(int(n), len(ds))
    if count == 0:
        raise ValueError(f"split {split!r} of profile {cfg.profile!r} has no volumes; pick another split "
                         f"with --set lung_ddpm.eval_split=...")
    items = [ds[i] for i in range(count)]
    return {"ct": torch.stack([it["ct"].float() for it in items]),
            "layout": torch.stack([make_layout(it["lung"][None], it["label"][None])[0] for it in items]),
            "scan_id": [it["scan_id"] for it in items]}


def metrics(cfg: "Config", samples: "torch.Tensor", real: "torch.Tensor", layouts: "torch.Tensor",
            real_features: Any = None) -> dict[str, Any]:
    """One row of the ablation table: FID and MMD (3D CT features) with percentile bootstrap intervals
    (``cfg.evaluation.bootstrap`` resamples, 95%), masked MSE in the lung, seam ratio; ``"fake_features"`` holds
    the samples' features [N, D] (for :func:`lungsynth.viz.mds_figure`).

    Args: samples, real [N, 1, S, S, S] in [0, 1] (paired); layouts [N, 1, S, S, S].
        real_features: ``(features, network)`` of ``real`` to reuse across rows.
    """
    import warnings

    from lungsynth.eval.distribution import fid, mmd
    from lungsynth.eval.features import extract_features
    from lungsynth.eval.fidelity import masked_mse

    unit_range = (cfg.data.hu_min, cfg.data.hu_max)
    network = cfg.evaluation.feature_network
    real_f, name = real_features or extract_features(real.numpy(), network, "unit", unit_range=unit_range)
    fake_f, _ = extract_features(samples.numpy(), network, "unit", unit_range=unit_range)
    lung = layouts >= 1  # the lungs (with their nodules), whatever the row generated
    boot = int(cfg.evaluation.bootstrap)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # few-sample warnings: the row says n
        f = fid(real_f, fake_f, network=name, bootstrap=boot, seed=cfg.seed)
        m = mmd(real_f, fake_f, network=name, bootstrap=boot, seed=cfg.seed)
    return {"fid": float(f.value), "fid_ci": _interval(f), "mmd": float(m.value), "mmd_ci": _interval(m),
            "masked_mse": float(masked_mse(samples.numpy(), real.numpy(), lung.numpy()).mean()),
            "seam_ratio": float(seam_ratio(samples, real, lung).mean()), "n": int(samples.shape[0]),
            "features": name, "fake_features": fake_f}


def _interval(result: Any) -> tuple[float, float] | str | None:
    """The interval of a :class:`lungsynth.eval.distribution.MetricResult`: (low, high), "insufficient N ..."
    below the minimum sample count, None without replicates."""
    return result.interval(4) if result.bootstrap else None


def evaluate(cfg: "Config", rows: Sequence[str] | None = None, *, split: str | None = None, n: int | None = None,
             seed: int = 0, outputs: dict | None = None, progress: bool = False) -> dict[str, dict[str, Any]]:
    """The ablation table (paper Table IV): ``{row: {fid, mmd, masked_mse, seam_ratio, n, seconds}}``.

    Trains the needed variants when missing. ``outputs``, when given, receives ``real``, ``layout``,
    ``scan_id``, ``samples`` ({row: [N, 1, S, S, S]}) and ``features`` ({"real" or row: [N, D]}) for figures.
    """
    from lungsynth.eval.features import extract_features

    rows = list(rows or ABLATIONS)
    unknown = [r for r in rows if r not in ABLATIONS]
    if unknown:
        raise ValueError(f"unknown ablation row(s) {unknown}; rows: {', '.join(ABLATIONS)}")
    data = eval_volumes(cfg, split, cfg.lung_ddpm.n_eval if n is None else n)
    real_f = extract_features(data["ct"].numpy(), cfg.evaluation.feature_network, "unit",
                              unit_range=(cfg.data.hu_min, cfg.data.hu_max))
    table: dict[str, dict[str, Any]] = {}
    samples: dict[str, Any] = {}
    features: dict[str, Any] = {}
    models: dict[str, LungDDPM] = {}
    for row in rows:
        variant, aas = ABLATIONS[row]
        if variant not in models:
            models[variant] = load(cfg, variant, progress=progress)
            fingerprint.refuse_overlap(models[variant].run_dir, prepared_root(cfg), (split or cfg.lung_ddpm.eval_split,),
                                       what=f"Lung-DDPM {variant} run")
        t0 = time.perf_counter()
        samples[row] = generate(models[variant], data["layout"], data["ct"], aas=aas, seed=seed, progress=progress)
        seconds = time.perf_counter() - t0
        row_metrics = metrics(cfg, samples[row], data["ct"], data["layout"], real_f)
        features[row] = row_metrics.pop("fake_features")
        table[row] = {**row_metrics, "source": data_source(cfg),
                      "sample_s_per_volume": round(seconds / data["ct"].shape[0], 3)}
    if outputs is not None:
        outputs.update(real=data["ct"], layout=data["layout"], scan_id=data["scan_id"], samples=samples,
                       features={"real": real_f[0], **features})
    return table


# --------------------------------------------------------------------------- quality gates (course profile)

CHAPTER = "06"
GATES_VERSION = 3  # 3: tiles on a grid shifted every step (lungsynth.diffusion.tiling)
GATES_FILE = "06_lung_ddpm_gates.json"
# thresholds (fixed here; never loosened to pass)
MAX_LUNG_JSD = 0.1  # bits: the lung's HU histogram (40 bins, -1000..400) close to its real volume's ...
MAX_LUNG_JSD_SHARE = 0.25  # ... and at most a quarter of the noise baseline's (real voxels shuffled in the body)
MAX_KID_SHARE = 0.1  # KID of lung-centred crops at most a tenth of the noise baseline's
MIN_NODULE_SHARE = 0.8  # nodules >= 6 mm keeping half their real contrast (eval.nodules), in >= 80% of them
SEAM_RANGE = (0.8, 1.25)  # edges at the lung boundary as strong as the real anatomy's, within 25%
MIN_SAMPLES = 8  # fewer volumes: KID and the means are too noisy to judge ("insufficient N")
MIN_NODULES = 5
FAST_SAMPLER = "ddim"  # gate 5: the fast sampler passes gates 1-4 too


def lung_crops(volumes: "torch.Tensor", layouts: "torch.Tensor", side: int) -> "torch.Tensor":
    """A cube of ``side`` per volume, centred on the centroid of its lungs (shifted to fit):
    [N, 1, S, S, S] -> [N, 1, side, side, side]. The structure gate reads these (what the model generates)."""
    import torch

    from lungsynth.data.patches import cube_slices

    out = []
    for v, lay in zip(volumes, layouts):
        idx = torch.nonzero(lay[0] >= 1).float()
        centre = idx.mean(0).round().long().tolist() if len(idx) else [s // 2 for s in lay.shape[1:]]
        out.append(v[(slice(None), *cube_slices(v.shape[1:], side, centre))])
    return torch.stack(out)


def volume_measures(cfg: "Config", sample_hu: Any, real_hu: Any, layout: Any) -> dict[str, Any]:
    """What the gates read of one generated volume against its paired real one ([S, S, S] HU, layout in
    {0, 1, 2}): lung HU-histogram JSD, nodule contrasts (generated and real) and the seam ratio."""
    import numpy as np
    import torch

    from lungsynth.eval.fidelity import hu_histogram_jsd
    from lungsynth.eval.nodules import label_nodules, nodule_contrast

    lay = np.asarray(layout)
    lung = lay == 1
    spacing = voxel_mm(cfg)
    nodules = label_nodules(lay == 2, spacing)
    lungs = lay >= 1
    seam = seam_ratio(torch.as_tensor(sample_hu)[None, None], torch.as_tensor(real_hu)[None, None],
                      torch.as_tensor(lungs)[None, None])
    return {"lung_jsd": hu_histogram_jsd(sample_hu, real_hu, mask_a=lung, mask_b=lung),
            "contrasts": [nodule_contrast(sample_hu, n["mask"], lungs, spacing) for n in nodules],
            "real_contrasts": [nodule_contrast(real_hu, n["mask"], lungs, spacing) for n in nodules],
            "seam_ratio": float(seam[0])}


def _crop_features(cfg: "Config", volumes: "torch.Tensor", layouts: "torch.Tensor") -> Any:
    """Features of the lung-centred crops (half the volume's side) of volumes [N, 1, S, S, S] in [0, 1]."""
    from lungsynth.eval.features import extract_features

    crops = lung_crops(volumes, layouts, int(cfg.data.size_ddpm) // 2).numpy()
    return extract_features(crops, cfg.evaluation.feature_network, "unit",
                            unit_range=(cfg.data.hu_min, cfg.data.hu_max))[0]


def gate_samplers(cfg: "Config") -> list[str]:
    """The samplers the gates judge: the configured one, and the fast one (gate 5) when that is another."""
    return list(dict.fromkeys([cfg.lung_ddpm.sampler, FAST_SAMPLER]))


def measure(cfg: "Config", model: LungDDPM, *, n: int = MIN_SAMPLES, seed: int = 0,
            samplers: Sequence[str] | None = None) -> list[Any]:
    """The gates of one model on ``n`` held-out volumes (test split, half A of
    :func:`lungsynth.eval.baselines.halves`), each sampled with AAS against its own CT by every sampler of
    ``samplers`` (default :func:`gate_samplers`; six rows each). Baselines on the same volumes and N, measured
    once: noise (the same volumes, voxels shuffled inside the body) and, for KID, the real floor (half A
    against the reference half B). Halves of fewer than 2 volumes are not sampled at all: every row then says
    "insufficient N"."""
    from lungsynth.eval.baselines import halves

    data = eval_volumes(cfg, "test")
    a, r = halves(len(data["ct"]), seed)
    a = a[:n]
    enough = len(a) >= 2 and len(r) >= 2
    baselines = _baselines(cfg, data, a, r, seed) if enough else {}
    rows = []
    for sampler in samplers or gate_samplers(cfg):
        values = {**baselines, **_measured(cfg, model, data, a, r, seed, sampler, baselines)} if enough else {}
        rows += _gate_rows(cfg, model, sampler, values, len(a))
    return rows


def _baselines(cfg: "Config", data: dict[str, Any], a: Any, r: Any, seed: int) -> dict[str, Any]:
    """What the gates read against: the noise baseline's JSD and crop KID, the real floor of KID."""
    import numpy as np
    import torch

    from lungsynth.autoencoders.evaluate import body_mask
    from lungsynth.data.preprocess import hu_to_unit, unit_to_hu
    from lungsynth.eval.baselines import compare, shuffle_in_body

    ct, layout = data["ct"][a], data["layout"][a]
    real_hu = unit_to_hu(ct, cfg.data.hu_min, cfg.data.hu_max).numpy()[:, 0]
    lays = layout[:, 0].numpy()
    # the lungs are named as body: the slice-wise hole filling of body_mask misses them where the lung air
    # reaches the outside in a slice (measured on the course phantom: 6% of lung voxels inside in 2 of 3 volumes)
    noise_hu = np.stack([shuffle_in_body(v[None], body_mask(v, lay >= 1)[None], seed=i)[0]
                         for i, (v, lay) in enumerate(zip(real_hu, lays))])
    noise = [volume_measures(cfg, *vols) for vols in zip(noise_hu, real_hu, lays)]
    network = cfg.evaluation.feature_network
    reference = _crop_features(cfg, data["ct"][r], data["layout"][r])
    noise_unit = hu_to_unit(torch.as_tensor(noise_hu)[:, None], cfg.data.hu_min, cfg.data.hu_max)
    floor, kid_noise = (compare(reference, _crop_features(cfg, v, layout), network=network).value
                        for v in (ct, noise_unit))
    return {"jsd_noise": float(np.mean([x["lung_jsd"] for x in noise])), "kid_floor": floor,
            "kid_noise": kid_noise, "reference_features": reference}


def _measured(cfg: "Config", model: LungDDPM, data: dict[str, Any], a: Any, r: Any, seed: int, sampler: str,
              baselines: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from lungsynth.data.preprocess import unit_to_hu
    from lungsynth.eval.baselines import compare
    from lungsynth.eval.nodules import contrast_share

    ct, layout = data["ct"][a], data["layout"][a]
    t0 = time.perf_counter()
    samples = generate(model, layout, ct, aas=True, seed=seed, sampler=sampler)
    seconds = (time.perf_counter() - t0) / len(a)
    real_hu = unit_to_hu(ct, cfg.data.hu_min, cfg.data.hu_max).numpy()[:, 0]
    syn_hu = unit_to_hu(samples, cfg.data.hu_min, cfg.data.hu_max).numpy()[:, 0]
    syn = [volume_measures(cfg, *vols) for vols in zip(syn_hu, real_hu, layout[:, 0].numpy())]
    kid = compare(baselines["reference_features"], _crop_features(cfg, samples, layout),
                  network=cfg.evaluation.feature_network).value
    share, n_nodules = contrast_share([c for x in syn for c in x["contrasts"]],
                                      [c for x in syn for c in x["real_contrasts"]])
    return {"jsd": float(np.mean([x["lung_jsd"] for x in syn])), "kid": kid, "nodule_share": share,
            "n_nodules": n_nodules, "seam": float(np.mean([x["seam_ratio"] for x in syn])), "seconds": seconds}


def _gate_rows(cfg: "Config", model: LungDDPM, sampler: str, v: dict[str, Any], n_vol: int) -> list[Any]:
    """The six gate rows of one sampler from :func:`_measured`'s values (an empty dict: nothing measured)."""
    from lungsynth.eval.nodules import MIN_CONTRAST_RATIO, MIN_NODULE_MM
    from lungsynth.gates import judge

    fast = " (gate 5: the fast sampler)" if sampler == FAST_SAMPLER and sampler != cfg.lung_ddpm.sampler else ""
    label = f"lung_ddpm {model.variant} ({sampler}, {cfg.lung_ddpm.sample_steps} steps{fast})"
    shuffled = "voxels shuffled in body"
    seconds = f"{v['seconds']:.1f} s a volume" if v else "not sampled: too few held-out volumes"
    floor = f"real floor {v['kid_floor']:.4f} (half A against half B, n {n_vol})" if v else ""
    return [
        judge(CHAPTER, f"{label}: lung HU-histogram JSD vs the paired real (bits)", v.get("jsd"), n=n_vol,
              n_needed=MIN_SAMPLES, at_most=MAX_LUNG_JSD, baseline=v.get("jsd_noise"), baseline_name=shuffled,
              detail=seconds),
        judge(CHAPTER, f"{label}: lung JSD against the noise baseline's", v.get("jsd"), n=n_vol,
              n_needed=MIN_SAMPLES, factor=MAX_LUNG_JSD_SHARE, baseline=v.get("jsd_noise"), baseline_name=shuffled),
        judge(CHAPTER, f"{label}: KID of lung-centred crops", v.get("kid"), n=n_vol, n_needed=MIN_SAMPLES,
              factor=MAX_KID_SHARE, baseline=v.get("kid_noise"), baseline_name=shuffled, detail=floor),
        judge(CHAPTER, f"{label}: nodules >= {MIN_NODULE_MM:g} mm with >= {MIN_CONTRAST_RATIO:g} x real contrast",
              v.get("nodule_share"), n=int(v.get("n_nodules", 0)), n_needed=MIN_NODULES, at_least=MIN_NODULE_SHARE,
              baseline_name="the paired real volumes"),
        judge(CHAPTER, f"{label}: seam ratio at the lung boundary (low end)", v.get("seam"), n=n_vol,
              n_needed=MIN_SAMPLES, at_least=SEAM_RANGE[0]),
        judge(CHAPTER, f"{label}: seam ratio at the lung boundary (high end)", v.get("seam"), n=n_vol,
              n_needed=MIN_SAMPLES, at_most=SEAM_RANGE[1]),
    ]


def quality_gates(cfg: "Config") -> list[Any]:
    """Chapter 06's gates on the trained Lung-DDPM (an untrained run is listed with its command); measured once
    per checkpoint, sampler and data, then read from ``runs/<profile>/06_lung_ddpm_gates.json``."""
    from lungsynth import paths
    from lungsynth.gates import cached, file_digest, not_trained
    from lungsynth.methods.lung_ddpm.train import default_run_dir, is_trained

    run = default_run_dir(cfg, "layout")
    command = f"lungsynth lung-ddpm train --profile {cfg.profile}"
    if not is_trained(run):
        return [not_trained(CHAPTER, "lung_ddpm layout", command)]
    fingerprint.refuse_overlap(run, prepared_root(cfg), ("test",), what="Lung-DDPM layout run")
    key = {"gates": GATES_VERSION, "weights": file_digest(run / "final.pt"),
           "data": fingerprint.load(prepared_root(cfg))["id"], "samplers": gate_samplers(cfg),
           "steps": int(cfg.lung_ddpm.sample_steps), "ema": bool(cfg.lung_ddpm.sample_ema),
           "tile": int(cfg.lung_ddpm.sample_tile),
           "network": cfg.evaluation.feature_network}
    return cached(paths.runs_dir(cfg.profile) / GATES_FILE, key,
                  lambda: measure(cfg, load(cfg, "layout", run, train_if_missing=False)))
