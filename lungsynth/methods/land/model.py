"""LAND (chapter 03): variants, conditions (validation, image volume, latent grid), the denoiser, its loss.

The poster (``/work/shared/papers/000_6102a2132f5ee72a.txt``) numbers none of its equations; the comments
cite them by section: "Volumetric Conditioning" (the masks), "3D U-Net (Latent Diffusion)" (the
denoiser) and "Velocity Prediction Training" (the loss ``L_min-SNR``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

# The poster's Table 1 rows (LAND-Mask, LAND-LatentMask, LAND-LatentMask+) plus the unconditional model and
# a nodule-only ablation: "mask" and "nodule-only" differ only by the lung, so the lung's effect on FID
# ("including lung areas in the conditioning masks improves FID") is one row against another.
VARIANTS: tuple[str, ...] = ("none", "nodule-only", "mask", "latentmask", "latentmask-texture")
CONDITIONS: dict[str, str] = {"none": "none", "nodule-only": "nodule", "mask": "nodule+lung",
                              "latentmask": "nodule+lung", "latentmask-texture": "nodule+lung+texture"}
MAX_POOLED: tuple[str, ...] = ("nodule-only", "mask")  # to the latent grid by 3D max-pool x4, 1 channel
KIND = "land"
SAMPLERS: tuple[str, ...] = ("ddim", "ddpm")


# --------------------------------------------------------------------------- variants and conditions


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown LAND variant {variant!r}; valid: {', '.join(VARIANTS)}")
    return variant


def uses_mask_vae(variant: str) -> bool:
    return check_variant(variant).startswith("latentmask")


def cond_channels_of(variant: str, mask_latent_channels: int) -> int:
    """Channels K of a variant's latent-grid condition: 0 (none), 1 (max-pooled), the mask VAE's latents."""
    if check_variant(variant) == "none":
        return 0
    return 1 if variant in MAX_POOLED else int(mask_latent_channels)


# Poster, "Volumetric Conditioning": lungs 0.5, nodules 1..5 (non-solid -> solid), masks normalised to
# [0, 1] (divided by 5): every voxel of ``cond`` is 0 (background), 0.1 (lung) or t/5 for texture t.
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

    nodule-only: binary nodule mask; mask and latentmask: lung 0.1 and every nodule 1.0 (no
    texture); latentmask-texture: ``cond`` unchanged.
    """
    from lungsynth.nn.conditioning import LUNG_VALUE, lung_mask, nodule_mask

    if variant == "nodule-only":
        return nodule_mask(cond)
    if variant in ("mask", "latentmask"):
        nod, lung = nodule_mask(cond), lung_mask(cond)
        return torch.where(nod > 0, torch.ones_like(cond), lung * LUNG_VALUE)
    if variant == "latentmask-texture":
        return cond.float()
    raise ValueError(f"variant {variant!r} has no condition volume")


# Poster, "Volumetric Conditioning": the mask is "downsampled 4x via 3D max pooling or encoded with a
# dedicated VAE (LAND-LatentMask)", then concatenated with z_t and injected into cross-attention.
def condition_grid(cond: torch.Tensor, variant: str, mask_vae: Any = None, factor: int = 4) -> torch.Tensor | None:
    """Validated condition [B,1,S,S,S] -> latent-grid condition [B, K, S/4, S/4, S/4] (None for ``none``).

    ``nodule-only``, ``mask``: max-pool x4 (K = 1); ``latentmask*``: the mask VAE's scaled posterior
    mean (K = its latent channels).
    """
    from lungsynth.nn.conditioning import mask_to_latent_grid

    if variant == "none":
        return None
    vol = condition_volume(cond, variant)
    if variant in MAX_POOLED:
        return mask_to_latent_grid(vol, factor)
    if mask_vae is None:
        raise ValueError(f"variant {variant!r} encodes its mask with the mask VAE: pass mask_vae "
                         f"(lungsynth.autoencoders.ensure_autoencoder('maskvae', cfg))")
    dev = next(mask_vae.parameters()).device
    with torch.no_grad():
        return mask_vae.encode_latent(vol.to(dev), sample=False).float()


# --------------------------------------------------------------------------- the denoiser and its loss


def denoiser_spec(cfg: Any, variant: str, latent_channels: int = 4, cond_channels: int | None = None,
                  skip: str | None = None) -> dict[str, Any]:
    """Plain-typed architecture of the LAND denoiser (stored in checkpoints)."""
    check_variant(variant)
    if cond_channels is None:
        cond_channels = cond_channels_of(variant, int(cfg.autoencoders.mask_latent_channels))
    L = cfg.land
    # "condition" names what the grid was made of: a checkpoint trained when "mask" meant the nodule alone
    # (before the lung joined it) has no such key and is refused rather than sampled with the wrong grid
    return {"variant": variant, "condition": CONDITIONS[variant], "latent_channels": int(latent_channels),
            "cond_channels": int(cond_channels),
            "channels": [int(c) for c in L.unet_channels], "num_res_blocks": int(L.num_res_blocks),
            "attention_levels": [bool(a) for a in L.attention_levels], "num_head_channels": int(L.num_head_channels),
            "skip": skip or L.skip, "context_dim": int(L.context_dim) if cond_channels else None,
            "token_grid": int(L.token_grid), "token_hidden": int(L.token_hidden),
            "num_train_timesteps": int(L.num_train_timesteps), "schedule": L.schedule,
            "beta_start": float(L.beta_start), "beta_end": float(L.beta_end), "prediction_type": "v_prediction"}


# Poster, "3D U-Net (Latent Diffusion)": a 5-level 3D U-Net, two residual blocks per level, additive
# skips (h <- h + s instead of h <- [h, s]); cross-attention re-injects the condition at several resolutions.
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


# Poster, "Velocity Prediction Training": a linear noise schedule, the network predicts the velocity v.
LOSS_WEIGHTINGS = ("min-snr", "uniform")


def loss_gamma(cfg: Any) -> float | None:
    """The ``gamma`` of :func:`land_loss` for ``cfg.land.loss_weighting`` (None: uniform)."""
    weighting = str(cfg.land.loss_weighting)
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"land.loss_weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, got {weighting!r}")
    return float(cfg.land.min_snr_gamma) if weighting == "min-snr" else None


def make_scheduler(spec: dict[str, Any], kind: str = "ddpm"):
    """MONAI scheduler of the denoiser's schedule (linear betas, v-prediction)."""
    from lungsynth.diffusion.schedules import make_scheduler as _make

    return _make(kind, spec["num_train_timesteps"], spec["schedule"], spec["prediction_type"],
                 beta_start=spec["beta_start"], beta_end=spec["beta_end"])


# Poster, "Velocity Prediction Training" (unnumbered):
#     L_min-SNR = gamma(SNR_t) * || v_hat_t(z_t, m) - v_t ||^2
# with z_t = sqrt(ab_t) z0 + sqrt(1 - ab_t) eps, v_t = sqrt(ab_t) eps - sqrt(1 - ab_t) z0, SNR_t = ab_t / (1 - ab_t)
# and the Min-SNR weight of a v target gamma(SNR_t) = min(SNR_t, gamma) / (SNR_t + 1) (Hang et al. 2023).
def land_loss(denoiser: nn.Module, scheduler, z0: torch.Tensor, grid: torch.Tensor | None, gamma: float | None,
              timesteps: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """LAND's training loss on one batch: Min-SNR-gamma weighted MSE on the v target (``gamma`` None: the
    unweighted v MSE, ``cfg.land.loss_weighting = "uniform"``).

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
    w = min_snr_weights_for(scheduler, timesteps, gamma) if gamma is not None else torch.ones(B, device=z0.device)
    return {"loss": diffusion_loss(pred, v, weights=w, check_finite=False), "snr_weight": w.mean()}
