"""LAND (chapter 03): variants, condition validation and grids, the denoiser, its loss, the data."""

from __future__ import annotations

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
                         f"(lungsynth.autoencoders.ensure_autoencoder('maskvae', cfg))")
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
    from lungsynth.autoencoders import LatentDataset, ensure_autoencoder

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
