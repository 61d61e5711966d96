"""HR-LDM training (the paper's Algorithm 1): the training view of the data, the engine task, the runs.

The frozen 3D KL-VAE encodes the nodule crops once (:class:`LatentCache`); :class:`HrLdmTask` is one
step of Algorithm 1 (the loss, eq. 4-9, is :func:`lungsynth.methods.hr_ldm.model.hr_ldm_losses`);
:func:`train` / :func:`ensure_trained` write ``runs/<profile>/05_hr_ldm_{hist,nohist}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lungsynth import run_settings
from lungsynth.data import fingerprint
from lungsynth.data.datasets import training_stamp
from lungsynth.engine import TrainTask
from lungsynth.methods.hr_ldm.model import (KIND, SUBTYPES, HrLdmNet, TruncatedDecoder, crop_side, hr_ldm_losses,
                                            hu_histogram, make_schedulers, mask_to_latent, net_spec, unit_to_hu,
                                            validate_subtype)


# --------------------------------------------------------------------------- runs


def run_name(hist_loss: bool) -> str:
    """``05_hr_ldm_hist`` (HR-LDM) or ``05_hr_ldm_nohist`` (the MAISI-DDPM ablation)."""
    return "05_hr_ldm_hist" if hist_loss else "05_hr_ldm_nohist"


AUTOENCODERS = ("vae3d",)  # the chapter 02 kinds a run is trained through: their settings shape it too


def default_run_dir(cfg: Any, hist_loss: bool = True, create: bool = True) -> Path:
    """``runs/<profile>/`` + :func:`run_name`, with ``@<overrides>`` when ``cfg`` overrides a training setting
    (:func:`lungsynth.run_settings.run_name`)."""
    from lungsynth import paths

    return paths.run_dir(cfg.profile, run_settings.run_name(cfg, run_name(hist_loss), "hr_ldm", AUTOENCODERS),
                         create=create)


def frozen_vae(cfg: Any, vae: Any = None) -> Any:
    """``vae`` (or ``ensure_autoencoder("vae3d", cfg)``) in eval mode, without gradients."""
    if vae is not None:
        return vae.eval().requires_grad_(False)
    from lungsynth.autoencoders import ensure_autoencoder

    return ensure_autoencoder("vae3d", cfg).eval().requires_grad_(False)


# --------------------------------------------------------------------------- the training view of the data


def train_crops(cfg: Any, split: str = "train", sized: bool = True) -> Any:
    """The prepared nodule crops (``CropDataset``) at the side the model works on; with ``sized`` only the
    nodules of ``cfg.hr_ldm.size_range_mm`` (the paper trains and evaluates on 6-30 mm nodules, Sec. 4)."""
    from lungsynth.data.datasets import CropDataset, ensure_prepared

    ensure_prepared(cfg)
    ds = CropDataset(cfg, split, size=crop_side(cfg))
    if not sized:
        return ds
    lo, hi = (float(v) for v in cfg.hr_ldm.size_range_mm)
    keep = [i for i, d in enumerate(ds.table["diameter_mm"].astype(float)) if lo <= d <= hi]
    return torch.utils.data.Subset(ds, keep)


TRAIN_CONTEXTS = ("twin", "scan")  # the latents outside M in training: the healthy twin's, or the scan's own


class LatentCache(torch.utils.data.Dataset):
    """Nodule crops encoded once by the frozen VAE (it never changes, so encoding every step is waste).

    Items: ``z0`` [c, l, l, l] (posterior mean x scale factor), ``mask`` [1, l, l, l] (binary nodule
    channel, the M of eq. 4), ``cond`` [3, l, l, l] (max-pooled hrmask), ``feat_weight`` [1, *Sf]
    (the nodule's share of each truncated-decoder feature voxel, for eq. 7), ``nodule_share`` [1, l, l, l] (its
    share of each latent voxel, for ``hr_ldm.nodule_weight``), ``hist`` [bins] (HU histogram of the crop's
    nodule), ``subtype`` (long), ``twin_context`` (bool: z0 outside M is the healthy twin's).
    """

    def __init__(self, items: list[dict[str, torch.Tensor]]) -> None:
        if not items:
            raise ValueError("the HR-LDM latent cache is empty: the crop dataset has no nodules")
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]

    def twin_share(self) -> float:
        """The share of items whose latents outside M are their healthy twin's."""
        return float(np.mean([bool(it.get("twin_context", False)) for it in self.items]))

    def subtype_counts(self) -> list[int]:
        counts = [0, 0, 0]
        for it in self.items:
            counts[int(it["subtype"])] += 1
        return counts


def _check_crop_item(item: Mapping[str, Any], side: int) -> None:
    for key in ("ct", "hrmask", "subtype_id"):
        if key not in item:
            raise ValueError(f"crop item lacks {key!r}; HR-LDM needs CropDataset items with ct, hrmask, subtype_id")
    if tuple(item["ct"].shape) != (1, side, side, side) or tuple(item["hrmask"].shape) != (3, side, side, side):
        raise ValueError(f"crop items must be ct [1,{side},{side},{side}] and hrmask [3,...]; got "
                         f"{tuple(item['ct'].shape)} and {tuple(item['hrmask'].shape)}")


@torch.no_grad()
def build_latent_cache(cfg: Any, crops: Iterable[Mapping[str, Any]], vae: nn.Module,
                       trunc: TruncatedDecoder, limit: int = 0, batch: int = 8) -> LatentCache:
    """Encode crop items (``CropDataset`` items: ct [1,C,C,C] in [0,1], hrmask [3,C,C,C], subtype_id, and on
    phantom data ``healthy``, the same cube of the scan's healthy twin).

    With ``cfg.hr_ldm.train_context == "twin"`` an item with a healthy twin stores as ``z0`` the composite
    ``M z0(ct) + (1 - M) z0(healthy)``: the lesion's latents in the background synthesis inpaints into. Outside
    M the scan's own latents still carry the nodule (the encoder's receptive field reaches past M), and a model
    trained on them reads the nodule from there and draws lung into a healthy background (chapter 05 measures
    it). ``"scan"`` (the paper's) keeps the scan's latents; items without a twin (real LIDC) always do.
    """
    if cfg.hr_ldm.train_context not in TRAIN_CONTEXTS:
        raise ValueError(f"hr_ldm.train_context must be one of {TRAIN_CONTEXTS}, got {cfg.hr_ldm.train_context!r}")
    twin = cfg.hr_ldm.train_context == "twin"
    side = crop_side(cfg, vae.downsample)
    dev = next(vae.parameters()).device
    items: list[dict[str, torch.Tensor]] = []
    pending: list[Mapping[str, Any]] = []

    def flush() -> None:
        ct = torch.stack([torch.as_tensor(p["ct"]).float() for p in pending]).to(dev)
        hr = torch.stack([torch.as_tensor(p["hrmask"]).float() for p in pending]).to(dev)
        z0 = vae.encode_latent(ct, sample=False)
        cond = mask_to_latent(hr, vae.downsample)
        has_twin = [twin and p.get("healthy") is not None for p in pending]
        if any(has_twin):
            bg = torch.stack([torch.as_tensor(p["healthy"] if t else p["ct"]).float()
                              for p, t in zip(pending, has_twin)]).to(dev)
            inside = (cond[:, :1] > 0) | ~torch.tensor(has_twin, device=dev).reshape(-1, 1, 1, 1, 1)
            z0 = torch.where(inside, z0, vae.encode_latent(bg, sample=False))
        feat_shape = trunc(z0[:1] / vae.scale_factor).shape[2:]
        fw = F.adaptive_avg_pool3d(hr[:, :1], feat_shape)
        share = F.avg_pool3d(hr[:, :1], vae.downsample)  # the nodule's share of each latent voxel
        hu = unit_to_hu(ct, cfg)
        for j, p in enumerate(pending):
            items.append({"z0": z0[j].cpu(), "mask": (cond[j, :1] > 0).float().cpu(), "cond": cond[j].cpu(),
                          "feat_weight": fw[j].cpu(), "nodule_share": share[j].cpu(),
                          "hist": torch.from_numpy(hu_histogram(hu[j, 0], hr[j, 0], cfg.hr_ldm.hist_bins,
                                                                tuple(cfg.hr_ldm.hist_range_hu))).float(),
                          "subtype": validate_subtype(int(p["subtype_id"]))[0],
                          "twin_context": torch.tensor(has_twin[j])})
        pending.clear()

    for item in crops:
        _check_crop_item(item, side)
        if float(torch.as_tensor(item["hrmask"])[0].sum()) == 0:
            continue
        pending.append(item)
        if len(pending) == batch:
            flush()
        if limit and len(items) + len(pending) >= limit:
            break
    if pending:
        flush()
    return LatentCache(items)


# --------------------------------------------------------------------------- Algorithm 1


class HrLdmTask(TrainTask):
    """Algorithm 1 as an engine task (eq. 4-9, :func:`hr_ldm_losses`)."""

    kind = KIND

    def __init__(self, net: HrLdmNet, scheduler, trunc: TruncatedDecoder | None, hist_weight: float,
                 hist_bins: int = 40, hist_timestep_weighting: str = "none", nodule_weight: float = 1.0) -> None:
        self.net = net
        self.nodule_weight = float(nodule_weight)
        self.hist_timestep_weighting = hist_timestep_weighting
        self.scheduler = scheduler
        self.trunc = trunc
        self.hist_weight = float(hist_weight)
        self.hist_bins = int(hist_bins)

    def modules(self) -> dict[str, nn.Module]:
        return {"net": self.net}

    def setup(self, device: torch.device) -> None:
        if self.trunc is not None:
            self.trunc.to(device)

    def config(self) -> dict[str, Any]:
        return {**self.net.spec, "hist_loss": self.trunc is not None and self.hist_weight > 0}

    def training_step(self, batch: Mapping[str, torch.Tensor], step: int) -> dict[str, Any]:
        return hr_ldm_losses(self.net, self.scheduler, batch, self.trunc, self.hist_weight, self.hist_bins,
                             hist_timestep_weighting=self.hist_timestep_weighting, nodule_weight=self.nodule_weight)


# --------------------------------------------------------------------------- train / ensure_trained


def rebuild_command(cfg: Any, hist_loss: bool) -> str:
    return f"lungsynth hr-ldm train --profile {cfg.profile}{'' if hist_loss else ' --no-hist-loss'} --fresh"


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
    from lungsynth.runtime import RunRecord, seed_everything

    h = cfg.hr_ldm
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg, hist_loss)
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp = training_stamp(cfg) if crops is None else None
    fresh = fingerprint.claim_run(run_dir, stamp, rebuild_command(cfg, hist_loss), fresh=fresh)
    vae = frozen_vae(cfg, vae)
    trunc = TruncatedDecoder(vae)
    with RunRecord(run_dir, config=cfg.to_dict(), seed=cfg.seed,
                   command=f"lungsynth hr-ldm train --profile {cfg.profile}" + ("" if hist_loss else " --no-hist-loss")
                   ) as rec:
        with rec.timer("latent_cache"):
            cache = build_latent_cache(cfg, crops if crops is not None else train_crops(cfg), vae, trunc,
                                       limit=h.n_cache)
        rec["n_train_crops"] = len(cache)
        rec["subtype_counts"] = dict(zip(SUBTYPES, cache.subtype_counts()))
        rec["twin_context_share"] = cache.twin_share()
        rec["vae"] = str(getattr(vae, "checkpoint_path", "in-memory"))
        train_sched, _ = make_schedulers(cfg)
        seed_everything(cfg.seed)  # the initial weights (the engine seeds the rest)
        net = HrLdmNet(net_spec(cfg, vae.latent_channels))
        task = HrLdmTask(net, train_sched, trunc if hist_loss else None, h.hist_weight, h.hist_bins,
                         h.hist_timestep_weighting, h.nodule_weight)
        trainer = Trainer.from_config(cfg.engine, run_dir, max_steps=h.train_steps, batch_size=h.batch_size,
                                      lr=h.lr, schedule="polynomial", poly_power=h.lr_power, seed=cfg.seed,
                                      progress=progress, fresh=fresh)
        with rec.timer("train"):
            result = trainer.fit(task, cache)
        rec["steps"] = result.steps
        rec["last_losses"] = result.last_losses
    run_settings.record(run_dir, run_settings.training_settings(cfg, "hr_ldm", AUTOENCODERS))
    return run_dir


def ensure_trained(cfg: Any, hist_loss: bool = True, *, vae: Any = None,
                   crops: Iterable[Mapping[str, Any]] | None = None, run_dir: Path | str | None = None,
                   progress: bool | None = None) -> Path:
    """The run directory with a ``final.pt``: trains (or resumes a killed run) when it has none."""
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg, hist_loss)
    stamp = training_stamp(cfg) if crops is None else None
    if (run_dir / "final.pt").is_file() and fingerprint.check_run(run_dir, stamp, rebuild_command(cfg, hist_loss)):
        run_settings.check_recorded(run_dir, run_settings.training_settings(cfg, "hr_ldm", AUTOENCODERS),
                                    rebuild_command(cfg, hist_loss))
        return run_dir
    return train(cfg, hist_loss, run_dir, vae=vae, crops=crops, progress=progress)
