"""Chapter 03 — LAND: 3D latent diffusion of chest CT conditioned on lung, nodule and texture masks.

The method (LAND, on a MAISI-like 3D KL-VAE of chapter 02):

- latents ``z0 = s * (mu + sigma * eps)`` of the frozen ``vae3d`` (posterior sampled at every load,
  ``s`` the latent scale factor), ``[4, S/4, S/4, S/4]``;
- v-prediction: the denoiser predicts ``v = sqrt(ab_t) eps - sqrt(1 - ab_t) z0`` from
  ``z_t = sqrt(ab_t) z0 + sqrt(1 - ab_t) eps`` on a linear beta schedule, T = 1000;
- Min-SNR-gamma weighting: ``L = E_t[ min(SNR_t, gamma) / (SNR_t + 1) * ||v - v_hat||^2 ]`` with
  ``SNR_t = ab_t / (1 - ab_t)`` and gamma = 5 (``cfg.land.min_snr_gamma``), i.e. the x0-space weight
  ``min(SNR, gamma)`` written in v-space (:mod:`lungsynth.diffusion.objectives`);
- the condition, on the latent grid, is concatenated to ``z_t`` and re-injected by cross-attention
  (:class:`lungsynth.nn.conditioning.MaskTokenizer` tokens) in :class:`lungsynth.nn.unets.LandUNet`,
  a 5-level U-Net with additive skips.

Variants (``VARIANTS``) and what they condition on, all derived from the prepared ``cond`` volume
(background 0, lung 0.5, nodule texture 1..5, divided by 5):

=======================  =========================  =============================================
variant                  condition                  to the latent grid
=======================  =========================  =============================================
``none``                 none (unconditional)       —
``mask``                 nodule (binary)            3D max-pool x4 (LAND-Mask), 1 channel
``latentmask``           nodule + lung              mask VAE encoder (LAND-LatentMask); nodules
                                                    all given value 1 (no texture)
``latentmask-texture``   nodule + lung + texture    mask VAE encoder of ``cond`` itself (LAND+)
=======================  =========================  =============================================

What chapters 08-11 call::

    from lungsynth.methods import land
    run = land.ensure_trained(cfg, "latentmask-texture")        # trains when missing, resumes if killed
    model = land.load(cfg, "latentmask-texture")                # frozen, on the runtime device
    conds = land.heldout_conditions(cfg, "test")                # [N,1,S,S,S] prepared cond volumes
    out = land.sample(model, conds[:2], sampler="ddim", steps=50, seed=0)
    out["ct_hu"]   # [2,1,S,S,S] float32 HU;  out["ct"] in [0,1];  out["latents"] [2,4,S/4,S/4,S/4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from lungsynth.engine import TrainTask

VARIANTS: tuple[str, ...] = ("none", "mask", "latentmask", "latentmask-texture")
CONDITIONS: dict[str, str] = {"none": "none", "mask": "nodule", "latentmask": "nodule+lung",
                              "latentmask-texture": "nodule+lung+texture"}
KIND = "land"
SAMPLERS: tuple[str, ...] = ("ddim", "ddpm")


# --------------------------------------------------------------------------- variants and conditions


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown LAND variant {variant!r}; valid: {', '.join(VARIANTS)}")
    return variant


def uses_mask_vae(variant: str) -> bool:
    return check_variant(variant).startswith("latentmask")


def default_run_dir(cfg: Any, variant: str, create: bool = True) -> Path:
    """``runs/<profile>/03_land_<variant>``."""
    from lungsynth import paths

    return paths.run_dir(cfg.profile, f"03_land_{check_variant(variant)}", create=create)


def check_condition(cond: Any, cfg: Any, variant: str) -> torch.Tensor | None:
    """Validate a condition for ``variant``; returns it as float32 [B, 1, S, S, S] (None for ``none``).

    Expected: the prepared ``cond`` volume (or an edited one), shaped [S,S,S], [1,S,S,S] or
    [B,1,S,S,S] with S = ``cfg.data.size_3d``, every value one of 0 (background), 0.1 (lung) or
    t/5 for nodule texture t in 1..5. ValueError otherwise, saying what is expected.
    """
    from lungsynth.nn.conditioning import cond_levels

    check_variant(variant)
    S = int(cfg.data.size_3d)
    expected = (f"the prepared LAND condition volume: shape [{S},{S},{S}], [1,{S},{S},{S}] or [B,1,{S},{S},{S}] "
                f"(cfg.data.size_3d = {S}) with values 0 (background), 0.1 (lung) or texture/5 = 0.2..1.0 "
                f"(nodule texture 1..5)")
    if variant == "none":
        if cond is not None:
            raise ValueError("variant 'none' is unconditional: pass cond=None (or use a conditional variant: "
                             "mask, latentmask, latentmask-texture)")
        return None
    if cond is None:
        raise ValueError(f"variant {variant!r} conditions on {CONDITIONS[variant]}: pass {expected}")
    c = torch.as_tensor(np.asarray(cond) if not torch.is_tensor(cond) else cond).detach().float().cpu()
    while c.ndim < 5:
        c = c.unsqueeze(0)
    if c.ndim != 5 or c.shape[1] != 1 or tuple(c.shape[2:]) != (S, S, S):
        raise ValueError(f"condition of shape {tuple(np.shape(cond))} does not fit variant {variant!r}; expected {expected}")
    if not bool(torch.isfinite(c).all()):
        raise ValueError(f"condition holds NaN/inf; expected {expected}")
    levels = cond_levels()
    dist = (c.reshape(-1, 1) - levels.reshape(1, -1)).abs().min(1).values
    if float(dist.max()) > 1e-3:
        bad = c.reshape(-1)[dist > 1e-3][:5].tolist()
        raise ValueError(f"condition holds values such as {[round(v, 4) for v in bad]} that are not LAND classes; "
                         f"expected {expected}. A binary nodule mask is fine too (1 = nodule, texture 5)")
    return c


def condition_volume(cond: torch.Tensor, variant: str) -> torch.Tensor:
    """The image-resolution volume a variant encodes: [B,1,S,S,S] -> [B,1,S,S,S].

    mask: binary nodule mask; latentmask: lung 0.1 and every nodule 1.0 (no texture);
    latentmask-texture: ``cond`` unchanged.
    """
    from lungsynth.nn.conditioning import LUNG_VALUE, lung_mask, nodule_mask

    if variant == "mask":
        return nodule_mask(cond)
    if variant == "latentmask":
        nod, lung = nodule_mask(cond), lung_mask(cond)
        return torch.where(nod > 0, torch.ones_like(cond), lung * LUNG_VALUE)
    if variant == "latentmask-texture":
        return cond.float()
    raise ValueError(f"variant {variant!r} has no condition volume")


def condition_grid(cond: torch.Tensor, variant: str, mask_vae: Any = None, factor: int = 4) -> torch.Tensor | None:
    """Validated condition [B,1,S,S,S] -> latent-grid condition [B, K, S/4, S/4, S/4] (None for ``none``).

    ``mask``: max-pool x4 (K = 1); ``latentmask*``: the mask VAE's scaled posterior mean (K = its
    latent channels).
    """
    from lungsynth.nn.conditioning import mask_to_latent_grid

    if variant == "none":
        return None
    vol = condition_volume(cond, variant)
    if variant == "mask":
        return mask_to_latent_grid(vol, factor)
    if mask_vae is None:
        raise ValueError(f"variant {variant!r} encodes its mask with the mask VAE: pass mask_vae "
                         f"(lungsynth.nn.autoencoders.ensure_autoencoder('maskvae', cfg))")
    dev = next(mask_vae.parameters()).device
    with torch.no_grad():
        return mask_vae.encode_latent(vol.to(dev), sample=False).float()


# --------------------------------------------------------------------------- the denoiser


def denoiser_spec(cfg: Any, variant: str, latent_channels: int = 4, cond_channels: int | None = None,
                  skip: str | None = None) -> dict[str, Any]:
    """Plain-typed architecture of the LAND denoiser (stored in checkpoints)."""
    check_variant(variant)
    if cond_channels is None:
        cond_channels = 0 if variant == "none" else 1 if variant == "mask" else int(cfg.autoencoders.mask_latent_channels)
    L = cfg.land
    return {"variant": variant, "latent_channels": int(latent_channels), "cond_channels": int(cond_channels),
            "channels": [int(c) for c in L.unet_channels], "num_res_blocks": int(L.num_res_blocks),
            "attention_levels": [bool(a) for a in L.attention_levels], "num_head_channels": int(L.num_head_channels),
            "skip": skip or L.skip, "context_dim": int(L.context_dim) if cond_channels else None,
            "token_grid": int(L.token_grid), "token_hidden": int(L.token_hidden),
            "num_train_timesteps": int(L.num_train_timesteps), "schedule": L.schedule,
            "beta_start": float(L.beta_start), "beta_end": float(L.beta_end), "prediction_type": "v_prediction"}


class LandDenoiser(nn.Module):
    """LAND's denoiser: a :class:`~lungsynth.nn.unets.LandUNet` plus the mask tokenizer.

    ``forward(x [B, latent+K, s,s,s], t [B], grid [B, K, s,s,s] | None) -> v [B, latent, s,s,s]``:
    ``x`` is ``z_t`` with the grid condition already concatenated on channels (the sampler's
    ``"concat"``); ``grid`` is tokenized for the cross-attention layers.
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        from lungsynth.nn.conditioning import MaskTokenizer
        from lungsynth.nn.unets import LandUNet

        self.spec = dict(spec)
        k = int(spec["cond_channels"])
        self.tokenizer = (MaskTokenizer(k, int(spec["context_dim"]), int(spec["token_grid"]), int(spec["token_hidden"]))
                          if k else None)
        self.unet = LandUNet(int(spec["latent_channels"]) + k, int(spec["latent_channels"]), spec["channels"],
                             int(spec["num_res_blocks"]), spec["attention_levels"],
                             int(spec["context_dim"]) if k else None, spec["skip"], int(spec["num_head_channels"]))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, grid: torch.Tensor | None = None) -> torch.Tensor:
        if self.tokenizer is None:
            if grid is not None:
                raise ValueError("the unconditional LAND denoiser takes no condition grid")
            return self.unet(x, timesteps)
        if grid is None:
            raise ValueError(f"this LAND denoiser ({self.spec['variant']}) needs its condition grid "
                             f"[B, {self.spec['cond_channels']}, s, s, s]")
        return self.unet(x, timesteps, self.tokenizer(grid.to(x.dtype)))


def make_scheduler(spec: dict[str, Any], kind: str = "ddpm"):
    """MONAI scheduler of the denoiser's schedule (linear betas, v-prediction)."""
    from lungsynth.diffusion.schedules import make_scheduler as _make

    return _make(kind, spec["num_train_timesteps"], spec["schedule"], spec["prediction_type"],
                 beta_start=spec["beta_start"], beta_end=spec["beta_end"])


def land_loss(denoiser: nn.Module, scheduler, z0: torch.Tensor, grid: torch.Tensor | None, gamma: float,
              timesteps: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """LAND's training loss on one batch: Min-SNR-gamma weighted MSE on the v target.

    Args:
        z0: scaled latents [B, C, s,s,s]; grid: [B, K, s,s,s] or None.
        timesteps / noise: drawn uniformly / from N(0, I) when None (tests fix them).
    Returns: {"loss": scalar, "snr_weight": mean weight (for the log)}.
    """
    from lungsynth.diffusion.objectives import diffusion_loss, min_snr_weights_for, target_for
    from lungsynth.diffusion.schedules import add_noise

    B = z0.shape[0]
    if timesteps is None:
        timesteps = torch.randint(0, int(scheduler.num_train_timesteps), (B,), device=z0.device)
    if noise is None:
        noise = torch.randn_like(z0)
    z_t = add_noise(scheduler, z0, noise, timesteps)
    v = target_for(scheduler, z0, noise, timesteps)
    x = torch.cat([z_t, grid.to(z_t.dtype)], 1) if grid is not None else z_t
    pred = denoiser(x, timesteps, grid)
    w = min_snr_weights_for(scheduler, timesteps, gamma)
    return {"loss": diffusion_loss(pred, v, weights=w, check_finite=False), "snr_weight": w.mean()}


class LandTask(TrainTask):
    """The engine's view of LAND training: one denoiser, the loss of :func:`land_loss`."""

    kind = KIND

    def __init__(self, spec: dict[str, Any], gamma: float = 5.0) -> None:
        self.spec = dict(spec)
        self.denoiser = LandDenoiser(spec)
        self.scheduler = make_scheduler(spec)
        self.gamma = float(gamma)

    def modules(self) -> dict[str, nn.Module]:
        return {"denoiser": self.denoiser}

    def setup(self, device: torch.device) -> None:
        self.scheduler.to(device)

    def training_step(self, batch: Any, step: int) -> dict[str, Any]:
        return land_loss(self.denoiser, self.scheduler, batch["z"].float(), batch.get("grid"), self.gamma)

    def config(self) -> dict[str, Any]:
        return dict(self.spec)


# --------------------------------------------------------------------------- data


class LandDataset(torch.utils.data.Dataset):
    """Latents (a fresh posterior sample per load, from the vae3d cache) with precomputed grid conditions.

    Item: ``{"z": [4, s,s,s]}`` plus ``"grid": [K, s,s,s]`` for conditional variants.
    """

    def __init__(self, latents: Any, grids: Sequence[torch.Tensor] | None) -> None:
        self.latents, self.grids = latents, list(grids) if grids is not None else None
        if self.grids is not None and len(self.grids) != len(latents):
            raise ValueError(f"{len(self.grids)} condition grids for {len(latents)} latents")

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"z": self.latents[i]["z"].float()}
        if self.grids is not None:
            item["grid"] = self.grids[i]
        return item


def build_dataset(cfg: Any, variant: str, split: str = "train", mask_vae: Any = None) -> LandDataset:
    """The training set of ``variant``: vae3d latent cache of ``split`` + grids from the prepared ``cond``."""
    from lungsynth.nn.autoencoders import LatentDataset, ensure_autoencoder

    check_variant(variant)
    latents = LatentDataset(cfg, "vae3d", split)
    grids = None
    if variant != "none":
        if uses_mask_vae(variant) and mask_vae is None:
            mask_vae = ensure_autoencoder("maskvae", cfg)
        conds = heldout_conditions(cfg, split)
        if len(conds) != len(latents):
            raise ValueError(f"{split}: {len(conds)} condition volumes but {len(latents)} cached latents; "
                             f"re-encode with `lungsynth autoencoder encode --kind vae3d`")
        grids = [condition_grid(c[None], variant, mask_vae)[0].cpu() for c in conds]
    return LandDataset(latents, grids)


def heldout_conditions(cfg: Any, split: str = "test", n: int | None = None) -> torch.Tensor:
    """Prepared condition volumes of ``split`` (default the held-out test split): [N, 1, S, S, S]."""
    from lungsynth.data.datasets import VolumeDataset

    ds = VolumeDataset(cfg, split, keys=("cond",))
    if len(ds) == 0:
        raise ValueError(f"the {split} split of profile {cfg.profile} is empty; prepare more scans (cfg.data.n_scans)")
    idx = range(len(ds) if n is None else min(int(n), len(ds)))
    return torch.stack([torch.as_tensor(ds[i]["cond"]).float() for i in idx])


def heldout_by_nodule_size(cfg: Any, splits: Sequence[str] = ("test", "val")) -> torch.Tensor:
    """Held-out condition volumes of ``splits``, the one with the largest nodule first: [N, 1, S, S, S]
    (figures and the texture sweep want a nodule that spans several voxels)."""
    from lungsynth.nn.conditioning import nodule_mask

    conds = torch.cat([heldout_conditions(cfg, s) for s in splits])
    order = torch.argsort(nodule_mask(conds).flatten(1).sum(1), descending=True)
    return conds[order]


def real_volumes(cfg: Any, splits: Sequence[str] = ("test", "val")) -> torch.Tensor:
    """Real CT volumes in [0, 1] of the held-out splits: [N, 1, S, S, S]."""
    from lungsynth.data.datasets import VolumeDataset

    out = []
    for split in splits:
        ds = VolumeDataset(cfg, split, keys=("ct",))
        out += [torch.as_tensor(ds[i]["ct"]).float() for i in range(len(ds))]
    return torch.stack(out)


# --------------------------------------------------------------------------- train / load


def train(cfg: Any, variant: str, run_dir: Path | str | None = None, *, skip: str | None = None,
          progress: bool | None = None, fresh: bool = False) -> Path:
    """Train LAND ``variant`` into ``run_dir`` (default ``runs/<profile>/03_land_<variant>``).

    Resumes from ``last.pt`` unless ``fresh``. Writes final.pt, metrics.csv and run.json; returns the run dir.
    """
    from lungsynth.engine import Trainer
    from lungsynth.nn.autoencoders import ensure_autoencoder
    from lungsynth.runtime import RunRecord, seed_everything

    check_variant(variant)
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg, variant)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    with RunRecord(run_dir, config=cfg, seed=cfg.seed, command=f"land train --variant {variant}") as rec:
        with rec.timer("data"):
            vae = ensure_autoencoder("vae3d", cfg, progress=progress)
            mask_vae = ensure_autoencoder("maskvae", cfg, progress=progress) if uses_mask_vae(variant) else None
            ds = build_dataset(cfg, variant, "train", mask_vae)
        spec = denoiser_spec(cfg, variant, vae.latent_channels,
                             mask_vae.latent_channels if mask_vae is not None else None, skip)
        task = LandTask(spec, cfg.land.min_snr_gamma)
        trainer = Trainer.from_config(cfg.engine, run_dir, max_steps=cfg.land.train_steps, lr=cfg.land.lr,
                                      batch_size=cfg.land.batch_size, seed=cfg.seed, progress=progress, fresh=fresh)
        with rec.timer("train"):
            result = trainer.fit(task, ds)
        rec["variant"] = variant
        rec["condition"] = CONDITIONS[variant]
        rec["parameters"] = sum(p.numel() for p in task.denoiser.parameters())
        rec["steps"] = result.steps
        rec["last_losses"] = result.last_losses
        rec["vae_scale_factor"] = float(vae.scale_factor)
    return run_dir


def _is_done(run_dir: Path, cfg: Any, variant: str) -> bool:
    from lungsynth.engine import check_compatible, load_checkpoint

    final = run_dir / "final.pt"
    if not final.is_file():
        return False
    ckpt = load_checkpoint(final)
    # a run of another architecture (say land.skip=concat over an additive run) is refused, not reused
    check_compatible(ckpt, final, KIND, denoiser_spec(cfg, variant, int(cfg.autoencoders.latent_channels)))
    return int(ckpt.get("step", 0)) >= int(cfg.land.train_steps)


def ensure_trained(cfg: Any, variant: str, run_dir: Path | str | None = None, *, progress: bool | None = None) -> Path:
    """The run dir of a trained ``variant``: trains (or resumes a killed run) when final.pt is missing
    or has fewer steps than ``cfg.land.train_steps``."""
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg, variant)
    if _is_done(run_dir, cfg, variant):
        return run_dir
    return train(cfg, variant, run_dir, progress=progress)


def load_denoiser(run_dir: Path | str, device: torch.device | str = "cpu") -> LandDenoiser:
    """The trained denoiser of a LAND run (final.pt, else last.pt), built from the checkpoint's spec;
    eval mode, frozen."""
    from lungsynth.engine import load_checkpoint, load_weights

    run_dir = Path(run_dir)
    path = run_dir / "final.pt" if (run_dir / "final.pt").is_file() else run_dir
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != KIND:
        raise ValueError(f"{run_dir} holds a {ckpt.get('kind')!r} checkpoint, not a LAND denoiser")
    den = LandDenoiser(dict(ckpt["config"]))
    load_weights(path, kind=KIND, modules={"denoiser": den}, use_ema=False)
    return den.eval().requires_grad_(False).to(device)


@dataclass
class LandModel:
    """A trained LAND variant ready to sample: denoiser, frozen autoencoders, config."""

    variant: str
    denoiser: LandDenoiser
    vae: Any
    mask_vae: Any
    cfg: Any
    run_dir: Path | None
    device: torch.device

    @property
    def spec(self) -> dict[str, Any]:
        return self.denoiser.spec

    def grid(self, cond: torch.Tensor | None) -> torch.Tensor | None:
        """Validated condition -> latent grid on the model's device."""
        c = check_condition(cond, self.cfg, self.variant)
        if c is None:
            return None
        return condition_grid(c.to(self.device), self.variant, self.mask_vae, self.vae.downsample).to(self.device)


def load(cfg: Any, variant: str, run_dir: Path | str | None = None, *, device: torch.device | str | None = None,
         train_if_missing: bool = True) -> LandModel:
    """Load a trained variant (training it first when ``train_if_missing`` and it has no final.pt)."""
    from lungsynth import runtime
    from lungsynth.nn.autoencoders import ensure_autoencoder

    check_variant(variant)
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg, variant, create=train_if_missing)
    if train_if_missing:
        ensure_trained(cfg, variant, run_dir)
    dev = torch.device(device) if device is not None else runtime.device()
    den = load_denoiser(run_dir, dev)
    if den.spec.get("variant") != variant:
        raise ValueError(f"{run_dir} holds LAND variant {den.spec.get('variant')!r}, not {variant!r}; "
                         f"pass the run directory of a {variant!r} run")
    vae = ensure_autoencoder("vae3d", cfg, device=dev)
    mask_vae = ensure_autoencoder("maskvae", cfg, device=dev) if uses_mask_vae(variant) else None
    return LandModel(variant, den, vae, mask_vae, cfg, run_dir, dev)


# --------------------------------------------------------------------------- sampling


def sample(model: LandModel, cond: Any = None, n: int | None = None, *, sampler: str | None = None,
           steps: int | None = None, seed: int = 0, decode: bool = True, eta: float = 0.0,
           progress: bool = False) -> dict[str, Any]:
    """Generate CT volumes with a trained LAND model.

    Args:
        model: from :func:`load`.
        cond: condition volume(s) (see :func:`check_condition`); None for ``none``. A single volume
            with ``n > 1`` is repeated (different noise per sample).
        n: number of volumes (default: the batch of ``cond``, else 1).
        sampler: ``"ddim"`` (default ``cfg.land.sampler``) or ``"ddpm"`` — the same checkpoint serves both.
        steps: reverse steps (default ``cfg.land.ddim_steps`` / ``cfg.land.ddpm_steps``; DDPM with
            T = 1000 steps is the paper's sampler, fewer steps respace the betas).
        seed: seeds the start noise and DDPM noise.
        decode: decode the latents with the vae3d (sliding window beyond ``cfg.autoencoders.sliding_roi``).
    Returns:
        ``{"latents" [B,4,s,s,s], "ct" [B,1,S,S,S] in [0,1], "ct_hu" [B,1,S,S,S], "cond" [B,1,S,S,S] | None,
        "sampler", "steps", "seconds"}`` (CPU tensors; no "ct" keys when ``decode`` is False).
    """
    from lungsynth.data.preprocess import unit_to_hu
    from lungsynth.diffusion.samplers import sample as reverse

    cfg = model.cfg
    sampler = sampler or cfg.land.sampler
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; use {' or '.join(SAMPLERS)}")
    c = check_condition(cond, cfg, model.variant)
    B = int(n) if n is not None else (c.shape[0] if c is not None else 1)
    if c is not None:
        if c.shape[0] == 1 and B > 1:
            c = c.expand(B, *c.shape[1:])
        elif c.shape[0] != B:
            raise ValueError(f"{c.shape[0]} condition volumes for n={B} samples; pass one volume or n of them")
    grid = condition_grid(c.to(model.device), model.variant, model.mask_vae, model.vae.downsample) \
        if c is not None else None
    if steps is None:
        steps = cfg.land.ddim_steps if sampler == "ddim" else cfg.land.ddpm_steps
    sched = make_scheduler(model.spec, sampler)
    s = int(cfg.data.size_3d) // int(model.vae.downsample)
    shape = (B, int(model.spec["latent_channels"]), s, s, s)
    gen = torch.Generator().manual_seed(int(seed))
    condition = {"concat": grid, "grid": grid} if grid is not None else None
    stats: dict[str, Any] = {}
    t0 = time.perf_counter()
    z = reverse(lambda x, t, **kw: model.denoiser(x, t, **kw), sched, shape, int(steps), generator=gen,
                device=model.device, condition=condition, eta=eta, progress=progress, stats=stats,
                desc=f"LAND {model.variant} {sampler}", amp=True)
    out: dict[str, Any] = {"latents": z.float().cpu(), "cond": c, "sampler": sampler, "steps": int(steps)}
    if decode:
        with torch.no_grad():
            x = model.vae.decode_latent(z.to(model.device), roi_size=cfg.autoencoders.sliding_roi).float().cpu()
        x = x.clamp(0.0, 1.0)
        out["ct"] = x
        out["ct_hu"] = unit_to_hu(x, cfg.data.hu_min, cfg.data.hu_max)
    out["seconds"] = time.perf_counter() - t0
    return out


# --------------------------------------------------------------------------- evaluation


def nodule_mean_hu(ct_hu: torch.Tensor, cond: torch.Tensor) -> list[float]:
    """Mean HU inside the nodule of each volume: ct_hu, cond [B,1,S,S,S] -> B floats (NaN if no nodule)."""
    from lungsynth.nn.conditioning import nodule_mask

    m = nodule_mask(cond).expand_as(ct_hu) > 0
    return [float(ct_hu[b][m[b]].mean()) if bool(m[b].any()) else float("nan") for b in range(ct_hu.shape[0])]


def texture_sweep(model: LandModel, cond: torch.Tensor, textures: Sequence[int] = (1, 2, 3, 4, 5), *,
                  seed: int = 0, steps: int | None = None, sampler: str | None = None) -> dict[str, Any]:
    """LAND+ texture control: the same mask and the same noise, nodule texture set to each of ``textures``.

    Returns ``{"rows": [{"texture", "mean_hu_nodule", "n_voxels"}], "ct_hu": [T,1,S,S,S], "conds": [T,1,S,S,S]}``.
    """
    from lungsynth.nn.conditioning import nodule_mask, set_texture

    if model.variant != "latentmask-texture":
        raise ValueError(f"texture control needs the latentmask-texture variant, this model is {model.variant!r}")
    c = check_condition(cond, model.cfg, model.variant)[:1]
    conds = torch.cat([set_texture(c, t) for t in textures])
    # the same start noise for every texture: one volume at a time with the same seed
    vols = torch.cat([sample(model, conds[i:i + 1], sampler=sampler, steps=steps, seed=seed)["ct_hu"]
                      for i in range(len(textures))])
    hu = nodule_mean_hu(vols, conds)
    nvox = int(nodule_mask(c).sum())
    rows = [{"texture": int(t), "mean_hu_nodule": round(h, 1), "n_voxels": nvox} for t, h in zip(textures, hu)]
    return {"rows": rows, "ct_hu": vols, "conds": conds}


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process (peak RSS is per process): load a variant and sample once."""
    import resource

    from lungsynth.config import get_config

    cfg = get_config(spec["profile"], spec.get("overrides") or {})
    model = load(cfg, spec["variant"], spec.get("run_dir"), train_if_missing=False)
    cond = heldout_conditions(cfg, "test", 1) if spec["variant"] != "none" else None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = sample(model, cond, 1, sampler=spec.get("sampler"), steps=spec.get("steps"), seed=0)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"peak_mb": peak, "loaded_mb": before, "sampling_mb": max(peak - before, 0.0), "seconds": out["seconds"]}


def _run_child(fn: str, spec: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    code = (f"import json, sys; from lungsynth.methods.land import {fn}; "
            f"print('LANDJSON' + json.dumps({fn}(json.loads(sys.argv[1]))))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("LANDJSON")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"measurement subprocess failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("LANDJSON"):])


def peak_sampling_memory(cfg: Any, variant: str, run_dir: Path | str | None = None, *, sampler: str | None = None,
                         steps: int | None = None, overrides: dict | None = None) -> dict[str, float]:
    """Peak memory of loading ``variant`` and sampling one volume, in a fresh process:
    ``{"peak_mb", "loaded_mb", "seconds"}`` (CUDA: max allocated; CPU: peak RSS, model load included)."""
    spec = {"profile": cfg.profile, "overrides": overrides or {}, "variant": variant,
            "run_dir": str(run_dir) if run_dir else None, "sampler": sampler, "steps": steps}
    return _run_child("_child", spec)


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
    write_json_atomic(paths.runs_dir(cfg.profile) / "03_land_table1.json", rows)
    return rows


# --------------------------------------------------------------------------- bench


def _bench_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One benchmark configuration in a fresh process: a train step, a denoiser call, or a whole sample."""
    import resource

    from lungsynth.diffusion.samplers import sample as reverse
    from lungsynth.runtime import device

    torch.manual_seed(0)
    dev = device()
    den = LandDenoiser(spec["denoiser"]).to(dev)
    s, k = int(spec["latent_size"]), int(spec["denoiser"]["cond_channels"])
    z = torch.randn(1, 4, s, s, s, device=dev)
    grid = torch.rand(1, k, s, s, s, device=dev)
    sched = make_scheduler(spec["denoiser"], "ddim")
    what, reps = spec["what"], int(spec.get("repeats", 3))
    cuda = dev.type == "cuda"

    def once() -> None:
        if what == "train_step":
            den.train()
            land_loss(den, sched, z, grid, 5.0)["loss"].backward()
        elif what == "denoiser_step":
            with torch.no_grad():
                den.eval()(torch.cat([z, grid], 1), torch.tensor([500], device=dev), grid)
        else:
            den.eval()
            reverse(lambda x, t, **kw: den(x, t, **kw), sched, (1, 4, s, s, s), int(spec["steps"]), device=dev,
                    condition={"concat": grid, "grid": grid}, progress=False)
        if cuda:
            torch.cuda.synchronize()

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # imports + model + inputs
    once()  # warm-up
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps if what != "sample" else 1):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    # CPU: peak RSS minus the RSS before the first call = what the computation itself added
    return {"seconds": float(np.median(times)), "peak_mb": peak, "delta_mb": peak if cuda else max(peak - base, 0.0),
            "params": sum(p.numel() for p in den.parameters())}


def bench_land(args: argparse.Namespace) -> int:
    """``lungsynth bench land [--size S]``: additive vs concatenated skips, each config in its own process."""
    from lungsynth.config import get_config, parse_overrides

    cfg = get_config(args.profile, parse_overrides(args.overrides))
    size = int(args.size or cfg.data.size_3d)
    if size % (4 * 2 ** (len(cfg.land.unet_channels) - 1)):
        raise ValueError(f"--size {size} must be a multiple of {4 * 2 ** (len(cfg.land.unet_channels) - 1)} "
                         f"(x4 autoencoder, {len(cfg.land.unet_channels)}-level U-Net)")
    s = size // 4
    steps = int(cfg.land.ddim_steps)
    print(f"LAND denoiser bench: image {size}^3 -> latent 4x{s}^3, channels {tuple(cfg.land.unet_channels)}, "
          f"{cfg.land.num_res_blocks} res blocks/level, condition latentmask-texture, DDIM {steps} steps, "
          f"repeats {args.repeats}; each number from its own process")
    res: dict[tuple[str, str], dict[str, Any]] = {}
    for what in ("train_step", "denoiser_step", "sample"):
        for skip in ("additive", "concat"):
            spec = {"denoiser": denoiser_spec(cfg, "latentmask-texture", 4, None, skip), "latent_size": s,
                    "what": what, "steps": steps, "repeats": args.repeats}
            r = _run_child("_bench_child", spec)
            res[(what, skip)] = r
            print(f"  {what:14s} {skip:9s} {r['seconds']:8.3f} s  peak {r['peak_mb']:9.1f} MB  "
                  f"(+{r['delta_mb']:.1f} MB over the loaded process)  params {r['params'] / 1e6:.2f}M", flush=True)
    print("ratios additive / concat (memory: CUDA max allocated; CPU: peak RSS increase over the loaded process):")
    for what in ("train_step", "denoiser_step", "sample"):
        a, c = res[(what, "additive")], res[(what, "concat")]
        mem = a["delta_mb"] / c["delta_mb"] if c["delta_mb"] > 0 else float("nan")
        print(f"  {what:14s} time {a['seconds'] / c['seconds']:.3f}  peak memory {mem:.3f}")
    a, c = res[("sample", "additive")], res[("sample", "concat")]
    print(f"  parameters {a['params'] / c['params']:.3f}")
    return 0


# --------------------------------------------------------------------------- CLI


def _save_nifti(path: Path, vol: np.ndarray, spacing: float) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.nii.gz")
    nib.save(nib.Nifti1Image(vol.astype(np.float32), np.diag([spacing] * 3 + [1.0])), str(tmp))
    import os

    os.replace(tmp, path)


def _cmd_train(args: argparse.Namespace) -> int:
    from lungsynth.config import get_config, parse_overrides

    cfg = get_config(args.profile, parse_overrides(args.overrides))
    if args.variant == "all" and args.run_dir:
        raise ValueError("--run-dir names one run: use it with a single --variant, or drop it for --variant all")
    for variant in (VARIANTS if args.variant == "all" else (args.variant,)):
        run = train(cfg, variant, args.run_dir, fresh=args.fresh)
        print(f"LAND {variant}: trained into {run}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from lungsynth.config import get_config, parse_overrides
    from lungsynth.nn.conditioning import move_nodule, resize_nodule, set_texture

    cfg = get_config(args.profile, parse_overrides(args.overrides))
    model = load(cfg, args.variant, args.run_dir)
    cond = None
    if args.variant != "none":
        conds = heldout_conditions(cfg, args.split)
        cond = conds[torch.arange(args.n) % len(conds)]
        if args.texture is not None:
            cond = set_texture(cond, args.texture)
        if args.move is not None:
            cond = move_nodule(cond, tuple(int(v) for v in args.move.split(",")))
        if args.resize is not None:
            cond = resize_nodule(cond, args.resize)
    out = sample(model, cond, args.n, sampler=args.sampler, steps=args.steps, seed=args.seed, progress=True)
    out_dir = Path(args.out) if args.out else model.run_dir / "samples"
    for i in range(out["ct_hu"].shape[0]):
        path = out_dir / f"land_{args.variant}_{out['sampler']}_s{args.seed}_{i:03d}_ct.nii.gz"
        _save_nifti(path, out["ct_hu"][i, 0].numpy(), cfg.data.spacing_3d_mm)
        if out["cond"] is not None:
            _save_nifti(path.with_name(path.name.replace("_ct.", "_cond.")), out["cond"][i, 0].numpy(),
                        cfg.data.spacing_3d_mm)
    print(f"LAND {args.variant}: {out['ct_hu'].shape[0]} volume(s) ({out['sampler']}, {out['steps']} steps, "
          f"{out['seconds']:.1f} s) written to {out_dir}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from lungsynth.config import get_config, parse_overrides

    cfg = get_config(args.profile, parse_overrides(args.overrides))
    variants = VARIANTS if args.variant == "all" else (args.variant,)
    rows = evaluate(cfg, variants, n_samples=args.n, overrides=parse_overrides(args.overrides))
    for r in rows:
        print(json.dumps(r))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """``lungsynth land train|sample|evaluate``."""
    from lungsynth.cli import add_profile_argument

    p = sub.add_parser("land", help="chapter 03: LAND 3D latent diffusion with anatomical masks")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>")
    verbs.required = True
    t = verbs.add_parser("train", help="train a variant (resumes a killed run)")
    t.add_argument("--variant", default="latentmask-texture", choices=VARIANTS + ("all",))
    t.add_argument("--run-dir", default=None)
    t.add_argument("--fresh", action="store_true", help="ignore last.pt and start over")
    add_profile_argument(t)
    t.set_defaults(func=_cmd_train)
    s = verbs.add_parser("sample", help="sample volumes (held-out or edited masks) into NIfTI files")
    s.add_argument("--variant", default="latentmask-texture", choices=VARIANTS)
    s.add_argument("--n", type=int, default=1)
    s.add_argument("--sampler", default=None, choices=SAMPLERS)
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--split", default="test", choices=("train", "val", "test"), help="where the masks come from")
    s.add_argument("--texture", type=int, default=None, help="set every nodule's texture (1..5)")
    s.add_argument("--move", default=None, help="move the nodule by dz,dy,dx voxels")
    s.add_argument("--resize", type=float, default=None, help="scale the nodule by this factor")
    s.add_argument("--run-dir", default=None)
    s.add_argument("--out", default=None)
    add_profile_argument(s)
    s.set_defaults(func=_cmd_sample)
    e = verbs.add_parser("evaluate", help="Table 1: FID, MS-SSIM, peak memory per variant")
    e.add_argument("--variant", default="all", choices=VARIANTS + ("all",))
    e.add_argument("--n", type=int, default=None)
    add_profile_argument(e)
    e.set_defaults(func=_cmd_evaluate)


# --------------------------------------------------------------------------- figures


def nodule_slices(volumes: torch.Tensor, conds: torch.Tensor | None) -> tuple[list[np.ndarray], list[Any]]:
    """Axial slices through each condition's nodule centre (volume centre without a nodule).

    Args: volumes [B,1,S,S,S] (HU), conds [B,1,S,S,S] or None. Returns: (slices [S,S], nodule masks [S,S] | None),
    ready for :func:`lungsynth.viz.image_grid`.
    """
    from lungsynth.nn.conditioning import nodule_mask

    imgs, masks = [], []
    for b in range(volumes.shape[0]):
        vol = volumes[b, 0].numpy()
        d = vol.shape[0] // 2
        m = None
        if conds is not None:
            c = conds[min(b, conds.shape[0] - 1), 0]
            nm = nodule_mask(c).numpy()
            if nm.any():
                d = int(np.round(np.argwhere(nm)[:, 0].mean()))
            m = nm[d]
        imgs.append(vol[d])
        masks.append(m)
    return imgs, masks
