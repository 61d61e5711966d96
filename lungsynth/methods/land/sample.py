"""LAND (chapter 03): load a trained variant, sample it (DDIM or DDPM from one checkpoint), held-out
conditions to sample on, and what sampling shows on its own: the nodule's mean HU, the texture sweep and
the peak memory of one sample (measured in a fresh process, since peak RSS is per process)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from lungsynth.methods.land.model import (CONDITIONS, KIND, SAMPLERS, LandDenoiser, check_condition, check_variant,
                                          condition_grid, make_scheduler, uses_mask_vae)
from lungsynth.methods.land.train import default_run_dir, ensure_trained, heldout_conditions, rebuild_command
from lungsynth.runtime import run_forked


# --------------------------------------------------------------------------- load


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


def check_trained_for(spec: dict[str, Any], variant: str, run_dir: Path | str, cfg: Any) -> None:
    """Raise ValueError unless the denoiser ``spec`` was trained for ``variant`` on that variant's condition."""
    if spec.get("variant") != variant:
        raise ValueError(f"{run_dir} holds LAND variant {spec.get('variant')!r}, not {variant!r}; "
                         f"pass the run directory of a {variant!r} run")
    if spec.get("condition") != CONDITIONS[variant]:
        had = spec.get("condition") or "nodule (trained before LAND-Mask included the lung)"
        raise ValueError(f"{run_dir} was trained on a condition of {had}, but {variant!r} conditions on "
                         f"{CONDITIONS[variant]}; retrain it: {rebuild_command(cfg, variant)}")


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
    check_trained_for(den.spec, variant, run_dir, cfg)
    vae = ensure_autoencoder("vae3d", cfg, device=dev)
    mask_vae = ensure_autoencoder("maskvae", cfg, device=dev) if uses_mask_vae(variant) else None
    return LandModel(variant, den, vae, mask_vae, cfg, run_dir, dev)


# --------------------------------------------------------------------------- sampling


def sample(model: LandModel, cond: Any = None, n: int | None = None, *, sampler: str | None = None,
           steps: int | None = None, seed: int = 0, decode: bool = True, eta: float = 0.0,
           progress: bool = False, batch: int | None = None, first_index: int = 0) -> dict[str, Any]:
    """Generate CT volumes with a trained LAND model.

    Args:
        model: from :func:`load`.
        cond: condition volume(s) (see :func:`check_condition`); None for ``none``. A single volume
            with ``n > 1`` is repeated (different noise per sample).
        n: number of volumes (default: the batch of ``cond``, else 1).
        sampler: ``"ddim"`` (default ``cfg.land.sampler``) or ``"ddpm"`` — the same checkpoint serves both.
        steps: reverse steps (default ``cfg.land.ddim_steps`` / ``cfg.land.ddpm_steps``; DDPM with
            T = 1000 steps is the poster's training schedule run in full, fewer steps respace the betas).
        seed: seeds the noise; sample ``first_index + i`` has its own stream, so a volume is the same
            whether it is drawn alone, in a chunk or with all the others.
        decode: decode the latents with the vae3d (sliding window beyond ``cfg.autoencoders.sliding_roi``).
        batch: volumes per reverse pass and decode (default ``cfg.land.eval_batch``): the working memory
            is one chunk's, however large ``n`` is (the result holds all ``n``; ``evaluate`` calls this
            chunk by chunk so that nothing holds them all).
        first_index: the index of the first volume in a longer run (chunked evaluation).
    Returns:
        ``{"latents" [B,4,s,s,s], "ct" [B,1,S,S,S] in [0,1], "ct_hu" [B,1,S,S,S], "cond" [B,1,S,S,S] | None,
        "sampler", "steps", "seconds"}`` (CPU tensors; no "ct" keys when ``decode`` is False).
    """
    from lungsynth.data.preprocess import unit_to_hu

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
    if steps is None:
        steps = cfg.land.ddim_steps if sampler == "ddim" else cfg.land.ddpm_steps
    chunk = max(1, int(batch or cfg.land.eval_batch))
    t0 = time.perf_counter()
    parts = [_sample_chunk(model, c[i:i + chunk] if c is not None else None, min(chunk, B - i), sampler,
                           int(steps), int(seed), int(first_index) + i, decode, eta, progress)
             for i in range(0, B, chunk)]
    out: dict[str, Any] = {"latents": torch.cat([p["latents"] for p in parts]), "cond": c, "sampler": sampler,
                           "steps": int(steps)}
    if decode:
        out["ct"] = torch.cat([p["ct"] for p in parts])
        out["ct_hu"] = unit_to_hu(out["ct"], cfg.data.hu_min, cfg.data.hu_max)
    out["seconds"] = time.perf_counter() - t0
    return out


def _sample_chunk(model: LandModel, c: torch.Tensor | None, n: int, sampler: str, steps: int, seed: int,
                  first: int, decode: bool, eta: float, progress: bool) -> dict[str, torch.Tensor]:
    """Volumes ``first .. first + n - 1`` of a run: one reverse pass and one decode ({"latents", "ct"})."""
    from lungsynth.diffusion.samplers import per_sample_generators
    from lungsynth.diffusion.samplers import sample as reverse

    cfg = model.cfg
    grid = condition_grid(c.to(model.device), model.variant, model.mask_vae, model.vae.downsample) \
        if c is not None else None
    sched = make_scheduler(model.spec, sampler)
    s = int(cfg.data.size_3d) // int(model.vae.downsample)
    shape = (n, int(model.spec["latent_channels"]), s, s, s)
    condition = {"concat": grid, "grid": grid} if grid is not None else None
    z = reverse(lambda x, t, **kw: model.denoiser(x, t, **kw), sched, shape, steps,
                generator=per_sample_generators(seed, first, n), device=model.device, condition=condition,
                eta=eta, progress=progress, desc=f"LAND {model.variant} {sampler}", amp=True)
    out = {"latents": z.float().cpu()}
    if decode:
        with torch.no_grad():
            x = model.vae.decode_latent(z.to(model.device), roi_size=cfg.autoencoders.sliding_roi).float().cpu()
        out["ct"] = x.clamp(0.0, 1.0)
    return out


def heldout_by_nodule_size(cfg: Any, splits: Sequence[str] = ("test", "val"), n: int = 4) -> torch.Tensor:
    """The ``n`` held-out condition volumes of ``splits`` with the largest nodules, largest first:
    [n, 1, S, S, S] (figures and the texture sweep want a nodule that spans several voxels). Conditions are
    read one at a time, so only the ``n`` returned are ever held."""
    from lungsynth.methods.land.train import HeldoutVolumes, largest_nodule_indices

    held = HeldoutVolumes(cfg, splits)
    return held.chunk(largest_nodule_indices(held, min(int(n), len(held))), "cond")


# --------------------------------------------------------------------------- measure while sampling


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


def _memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a process of its own (peak memory is per process): load a variant and sample once."""
    from lungsynth.config import get_config
    from lungsynth.runtime import peak_rss_mb

    cfg = get_config(spec["profile"], spec.get("overrides") or {})
    model = load(cfg, spec["variant"], spec.get("run_dir"), train_if_missing=False)
    cond = heldout_conditions(cfg, "test", 1) if spec["variant"] != "none" else None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    before = peak_rss_mb()
    out = sample(model, cond, 1, sampler=spec.get("sampler"), steps=spec.get("steps"), seed=0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else peak_rss_mb()
    return {"variant": spec["variant"], "peak_mb": peak, "loaded_mb": before, "sampling_mb": max(peak - before, 0.0),
            "seconds": out["seconds"]}


def peak_sampling_memory(cfg: Any, variants: Sequence[str], *, sampler: str | None = None, steps: int | None = None,
                         overrides: dict | None = None) -> dict[str, dict[str, float]]:
    """Peak memory of loading each variant's trained run and sampling one volume, each in a process of its own
    that starts from the same imports (one import for all, :func:`lungsynth.runtime.run_forked`):
    ``variant -> {"peak_mb", "loaded_mb", "sampling_mb", "seconds"}`` (CUDA: max allocated; CPU: the process's
    peak RSS, imports and model load included)."""
    specs = [{"profile": cfg.profile, "overrides": overrides or {}, "variant": v,
              "run_dir": str(default_run_dir(cfg, v)), "sampler": sampler, "steps": steps} for v in variants]
    # MONAI (the denoiser's and the autoencoder's networks) imported once before the forks: ~13 s a variant saved
    return {r["variant"]: r for r in run_forked("lungsynth.methods.land.sample:_memory_child", specs, timeout=1800,
                                                  preload=("monai",))}
