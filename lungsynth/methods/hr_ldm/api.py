"""HR-LDM's public API: train / ensure_trained / load / evaluate, and the CLI verbs."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from lungsynth.methods.hr_ldm.histogram import SUBTYPES, hu_histogram, js_divergence_np
from lungsynth.methods.hr_ldm.inpaint import HrLdm, NoduleLibrary, inpaint_crops, inpaint_volume
from lungsynth.methods.hr_ldm.model import (KIND, HrLdmNet, HrLdmTask, TruncatedDecoder, build_latent_cache,
                                            crop_side, default_run_dir, make_schedulers, net_spec, unit_to_hu)


def _vae(cfg: Any, vae: Any = None) -> Any:
    if vae is not None:
        return vae.eval().requires_grad_(False)
    from lungsynth.autoencoders import ensure_autoencoder

    return ensure_autoencoder("vae3d", cfg).eval().requires_grad_(False)


def train_crops(cfg: Any, split: str = "train") -> Any:
    """The prepared nodule crops (``CropDataset``) at the side the model works on."""
    from lungsynth.data.datasets import CropDataset, ensure_prepared

    ensure_prepared(cfg)
    return CropDataset(cfg, split, size=crop_side(cfg))


def train(cfg: Any, hist_loss: bool = True, run_dir: Path | str | None = None, *, vae: Any = None,
          crops: Iterable[Mapping[str, Any]] | None = None, fresh: bool = False, progress: bool | None = None) -> Path:
    """Algorithm 1: train HR-LDM (``hist_loss``) or its MAISI-DDPM ablation (no histogram term).

    Args:
        cfg: the profile's config (``cfg.hr_ldm``). run_dir: default ``runs/<profile>/05_hr_ldm_{hist,nohist}``.
        vae: the frozen 3D KL-VAE (default ``ensure_autoencoder("vae3d", cfg)``).
        crops: crop items (default the prepared ``CropDataset`` train split).
        fresh: start over instead of resuming from ``last.pt``.
    Returns:
        the run directory (``final.pt``, ``last.pt``, ``metrics.csv``, ``run.json``).
    """
    from lungsynth.engine import Trainer
    from lungsynth.runtime import RunRecord

    h = cfg.hr_ldm
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg, hist_loss)
    run_dir.mkdir(parents=True, exist_ok=True)
    vae = _vae(cfg, vae)
    trunc = TruncatedDecoder(vae)
    with RunRecord(run_dir, config=cfg.to_dict(), seed=cfg.seed,
                   command=f"lungsynth hr-ldm train --profile {cfg.profile}" + ("" if hist_loss else " --no-hist-loss")
                   ) as rec:
        with rec.timer("latent_cache"):
            cache = build_latent_cache(cfg, crops if crops is not None else train_crops(cfg), vae, trunc,
                                       limit=h.n_cache)
        rec["n_train_crops"] = len(cache)
        rec["subtype_counts"] = dict(zip(SUBTYPES, cache.subtype_counts()))
        rec["vae"] = str(getattr(vae, "checkpoint_path", "in-memory"))
        train_sched, _ = make_schedulers(cfg)
        net = HrLdmNet(net_spec(cfg, vae.latent_channels))
        task = HrLdmTask(net, train_sched, trunc if hist_loss else None, h.hist_weight, h.hist_bins,
                         h.hist_timestep_weighting)
        trainer = Trainer.from_config(cfg.engine, run_dir, max_steps=h.train_steps, batch_size=h.batch_size,
                                      lr=h.lr, schedule="polynomial", poly_power=h.lr_power, seed=cfg.seed,
                                      progress=progress, fresh=fresh)
        with rec.timer("train"):
            result = trainer.fit(task, cache)
        rec["steps"] = result.steps
        rec["last_losses"] = result.last_losses
    return run_dir


def ensure_trained(cfg: Any, hist_loss: bool = True, *, vae: Any = None,
                   crops: Iterable[Mapping[str, Any]] | None = None, run_dir: Path | str | None = None,
                   progress: bool | None = None) -> Path:
    """The run directory with a ``final.pt``: trains (or resumes a killed run) when it has none."""
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg, hist_loss)
    if (run_dir / "final.pt").is_file():
        return run_dir
    return train(cfg, hist_loss, run_dir, vae=vae, crops=crops, progress=progress)


def load(cfg: Any, run_dir: Path | str | None = None, hist_loss: bool = True, *, vae: Any = None,
         device: torch.device | str | None = None) -> HrLdm:
    """A trained :class:`HrLdm` (eval mode) from ``run_dir`` (default the variant's run dir)."""
    from lungsynth.engine import check_compatible, load_checkpoint
    from lungsynth.runtime import device as default_device

    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg, hist_loss)
    path = run_dir / "final.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no final.pt in {run_dir}; train it with `lungsynth hr-ldm train --profile "
                                f"{cfg.profile}{'' if hist_loss else ' --no-hist-loss'}` or ensure_trained(cfg)")
    ckpt = load_checkpoint(path)
    check_compatible(ckpt, path, KIND)
    spec = dict(ckpt["config"])
    net = HrLdmNet(spec)
    net.load_state_dict(ckpt["modules"]["net"])
    dev = torch.device(device) if device is not None else default_device()
    vae = _vae(cfg, vae).to(dev)
    _, sample_sched = make_schedulers(cfg)
    return HrLdm(net.to(dev).eval().requires_grad_(False), vae, sample_sched, cfg,
                 hist_loss=bool(spec.get("hist_loss", hist_loss)), run_dir=run_dir)


# --------------------------------------------------------------------------- evaluation


def _stack_items(items: Sequence[Mapping[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    ct = torch.stack([torch.as_tensor(it["ct"]).float() for it in items])
    hr = torch.stack([torch.as_tensor(it["hrmask"]).float() for it in items])
    return ct, hr, np.array([int(it["subtype_id"]) for it in items])


def generate_for_eval(model: HrLdm, items: Sequence[Mapping[str, Any]], n_per_subtype: int, seed: int = 0,
                      steps: int | None = None, batch: int = 8) -> dict[str, Any]:
    """Regenerate held-out nodules: for each subtype, up to ``n_per_subtype`` real crops of it (cycled
    when fewer) keep their background and mask; the lesion is inpainted with the crop's own subtype and
    HU histogram as conditions. Returns real and generated crops in HU [N, C, C, C], masks, subtypes."""
    cfg = model.cfg
    items = [it for it in items if float(torch.as_tensor(it["hrmask"])[0].sum()) > 0]
    if not items:
        raise ValueError("no evaluation crop has a non-empty nodule mask")
    ct, hr, sub = _stack_items(items)
    real, fake, masks, subs = [], [], [], []
    for y in range(3):
        idx = np.flatnonzero(sub == y)
        if idx.size == 0:
            continue
        pick = np.resize(idx, n_per_subtype)
        for i in range(0, len(pick), batch):
            j = pick[i:i + batch]
            hist = np.stack([hu_histogram(unit_to_hu(ct[k, 0], cfg), hr[k, 0], cfg.hr_ldm.hist_bins,
                                          tuple(cfg.hr_ldm.hist_range_hu)) for k in j])
            out = inpaint_crops(model, ct[j], hr[j], torch.full((len(j),), y), hist, steps=steps, seed=seed + i)
            real.append(unit_to_hu(ct[j, 0], cfg).numpy())
            fake.append(unit_to_hu(out["ct"][:, 0].cpu(), cfg).numpy())
            masks.append(hr[j, 0].numpy() > 0)
            subs.append(np.full(len(j), y))
    return {"real": np.concatenate(real), "fake": np.concatenate(fake), "mask": np.concatenate(masks),
            "subtype": np.concatenate(subs)}


def metrics_for(cfg: Any, gen: Mapping[str, np.ndarray], network: str | None = None) -> dict[str, Any]:
    """Per-subtype JSD of pooled lesion HU histograms, 2.5D FID/KID/MMD (mean over the three planes),
    and the mean |delta HU| outside the nodule mask after decoding."""
    from lungsynth.eval.distribution import evaluate_distribution
    from lungsynth.eval.features import features_25d

    bins, rng = cfg.hr_ldm.hist_bins, tuple(cfg.hr_ldm.hist_range_hu)
    row: dict[str, Any] = {}
    jsds = []
    for y, name in enumerate(SUBTYPES):
        keep = gen["subtype"] == y
        if not keep.any():
            row[f"jsd_{name}"] = float("nan")
            continue
        hr_ = hu_histogram(gen["real"][keep], gen["mask"][keep], bins, rng)
        hf_ = hu_histogram(gen["fake"][keep], gen["mask"][keep], bins, rng)
        row[f"jsd_{name}"] = js_divergence_np(hr_, hf_)
        jsds.append(row[f"jsd_{name}"])
    row["jsd_mean"] = float(np.mean(jsds)) if jsds else float("nan")
    net = network or ("astra" if cfg.evaluation.feature_network.startswith("astra") else "slicenet2d")
    fr, name = features_25d(gen["real"], "hu", network=net)
    ff, _ = features_25d(gen["fake"], "hu", network=net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # n < 50 is flagged in the row instead
        per_plane = [evaluate_distribution(fr[p], ff[p], cfg, network=name) for p in fr]
    for metric in ("fid", "kid", "mmd"):
        row[metric] = float(np.mean([float(pp[metric].value) for pp in per_plane]))
    row["delta_hu_outside"] = float(np.abs(gen["fake"] - gen["real"])[~gen["mask"]].mean())
    row["n"] = int(len(gen["fake"]))
    row["network"] = name
    return row


def evaluate(cfg: Any, models: Mapping[str, HrLdm] | None = None, *, items: Sequence[Mapping[str, Any]] | None = None,
             n_per_subtype: int | None = None, network: str | None = None, seed: int = 0) -> dict[str, Any]:
    """The chapter's ablation table: HR-LDM vs MAISI-DDPM (no histogram loss) on held-out nodules.

    Args:
        models: ``{"HR-LDM": model, "MAISI-DDPM (no hist loss)": model}`` (default: both, ensure_trained).
        items: evaluation crops (default the prepared val + test crops, train when those are empty).
        n_per_subtype: generated nodules per subtype (default ``cfg.hr_ldm.eval_per_subtype``).
    Returns:
        ``{"rows": [{"method", "jsd_solid", "jsd_part-solid", "jsd_ground-glass", "jsd_mean", "fid",
        "kid", "mmd", "delta_hu_outside", "n", "network"}], "generated": {method: arrays}}``.
    """
    if models is None:
        models = {"HR-LDM": load(cfg, ensure_trained(cfg, True), True),
                  "MAISI-DDPM (no hist loss)": load(cfg, ensure_trained(cfg, False), False)}
    if items is None:
        items = eval_items(cfg)
    n = int(n_per_subtype or cfg.hr_ldm.eval_per_subtype)
    rows, generated = [], {}
    for name, model in models.items():
        gen = generate_for_eval(model, items, n, seed=seed)
        generated[name] = gen
        rows.append({"method": name, **metrics_for(cfg, gen, network)})
    return {"rows": rows, "generated": generated}


def _with_nodule(ds: Any) -> list[Mapping[str, Any]]:
    items = [ds[i] for i in range(len(ds))]
    return [it for it in items if float(torch.as_tensor(it["hrmask"])[0].sum()) > 0]


def eval_items(cfg: Any) -> list[Mapping[str, Any]]:
    """Held-out crops with a non-empty nodule mask: val + test (train when both have none, as a tiny
    smoke split can)."""
    items: list[Mapping[str, Any]] = []
    for split in ("val", "test"):
        items += _with_nodule(train_crops(cfg, split))
    return items or _with_nodule(train_crops(cfg, "train"))


# --------------------------------------------------------------------------- CLI


def _parse_subtype(s: str) -> int:
    if s in SUBTYPES:
        return SUBTYPES.index(s)
    try:
        return int(s)
    except ValueError:
        raise ValueError(f"subtype {s!r}: use 0/solid, 1/part-solid or 2/ground-glass") from None


def _cmd_train(args: argparse.Namespace) -> int:
    from lungsynth.config import get_config, parse_overrides

    cfg = get_config(args.profile, parse_overrides(args.overrides))
    run_dir = train(cfg, not args.no_hist_loss, fresh=args.fresh)
    print(run_dir)
    return 0


def _cmd_inpaint(args: argparse.Namespace) -> int:
    import json

    import nibabel as nib

    from lungsynth.config import get_config, parse_overrides
    from lungsynth.data.datasets import VolumeDataset, ensure_prepared
    from lungsynth.runtime import write_json_atomic

    cfg = get_config(args.profile, parse_overrides(args.overrides))
    hist = not args.no_hist_loss
    ensure_prepared(cfg)
    model = load(cfg, ensure_trained(cfg, hist), hist)
    library = NoduleLibrary.from_prepared(cfg, "train")
    ds = VolumeDataset(cfg, args.split, keys=("ct", "lung"))
    if len(ds) == 0:
        raise ValueError(f"the {args.split} split has no scans; use --split train|val|test")
    item = ds[int(args.index) % len(ds)]
    ct = unit_to_hu(item["ct"][0].numpy(), cfg)
    size = tuple(float(v) for v in args.size_mm.split(",")) if args.size_mm else None
    res = inpaint_volume(model, ct, item["lung"][0].numpy(), _parse_subtype(args.subtype),
                         spacing_mm=cfg.data.spacing_3d_mm, library=library, size_range_mm=size,
                         include_rim=args.include_rim, seed=args.seed)
    out = Path(args.out) if args.out else default_run_dir(cfg, hist) / "inpainted"
    out.mkdir(parents=True, exist_ok=True)
    affine = np.diag([cfg.data.spacing_3d_mm] * 3 + [1.0])
    stem = f"{item['scan_id']}_{SUBTYPES[res.subtype]}_s{args.seed}"
    nib.save(nib.Nifti1Image(res.ct_hu.astype(np.float32), affine), str(out / f"{stem}_ct.nii.gz"))
    nib.save(nib.Nifti1Image(res.nodule_mask, affine), str(out / f"{stem}_label.nii.gz"))
    info = {"scan_id": item["scan_id"], "subtype": SUBTYPES[res.subtype], "centre": list(res.centre),
            "diameter_mm": res.diameter_mm, "delta_hu_outside": res.delta_hu_outside,
            "hist_jsd_to_target": js_divergence_np(res.target_histogram, res.generated_histogram),
            "checkpoint": str(model.run_dir)}
    write_json_atomic(out / f"{stem}.json", info)
    print(json.dumps(info))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from lungsynth.config import get_config, parse_overrides

    cfg = get_config(args.profile, parse_overrides(args.overrides))
    for row in evaluate(cfg)["rows"]:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
    return 0
