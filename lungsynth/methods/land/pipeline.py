"""LAND (chapter 03): train, ensure_trained, load, sample, texture sweep, figure helpers."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from lungsynth.methods.land.model import (CONDITIONS, KIND, SAMPLERS, LandDenoiser, LandTask, build_dataset,
                                          check_condition, check_variant, condition_grid, default_run_dir,
                                          denoiser_spec, make_scheduler, uses_mask_vae)

# --------------------------------------------------------------------------- train / load


def train(cfg: Any, variant: str, run_dir: Path | str | None = None, *, skip: str | None = None,
          progress: bool | None = None, fresh: bool = False) -> Path:
    """Train LAND ``variant`` into ``run_dir`` (default ``runs/<profile>/03_land_<variant>``).

    Resumes from ``last.pt`` unless ``fresh``. Writes final.pt, metrics.csv and run.json; returns the run dir.
    """
    from lungsynth.engine import Trainer
    from lungsynth.autoencoders import ensure_autoencoder
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
    from lungsynth.autoencoders import ensure_autoencoder

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
