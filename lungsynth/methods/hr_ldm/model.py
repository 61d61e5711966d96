"""HR-LDM's networks, latent cache and training (the paper's Algorithm 1).

Conditions (paper, Sec. 3):

- subtype ``y`` in {0 solid, 1 part-solid, 2 ground-glass}: a learned embedding added to the time
  embedding (MONAI ``DiffusionModelUNet(num_class_embeds=3)`` does exactly ``emb = t_emb + E[y]``);
- target HU histogram ``h`` (40 bins over [-1000, 400] HU): ``MLP_SiLU(h)`` is one context token for
  cross-attention;
- multi-channel nodule mask (nodule, solid core, ground-glass part) max-pooled x4 to the latent grid
  and concatenated to ``z_t``.

Algorithm 1, one step (``M`` = nodule mask on the latent grid):

    z~_t  = (1 - M) z_0 + M (sqrt(ab_t) z_0 + sqrt(1 - ab_t) eps)                       (eq. 3)
    L_eps = sum |eps - eps_theta(z~_t, t, y, h, mask)| M / sum M                        (eq. 4)
    z^_0  = M (z~_t - sqrt(1 - ab_t) eps_theta) / sqrt(ab_t) + (1 - M) z_0                (eq. 5)
    L_hist = JSD(H(D'(z^_0)), H(D'(z_0)))   D' = frozen decoder up to its penultimate res block,
                                             H = soft histogram over the lesion        (eq. 6-7)
    L = L_eps + lambda_hist L_hist,  lambda_hist = 10                                   (eq. 8)

with scaled-linear betas 0.0015..0.0195 over T = 1000 and polynomial LR decay (engine).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lungsynth.engine import TrainTask
from lungsynth.methods.hr_ldm.histogram import (feature_histograms, hu_histogram, js_divergence,
                                                validate_histogram, validate_subtype)

KIND = "hr_ldm"
MASK_CHANNELS = 3  # hrmask: nodule, solid core, ground-glass part
NUM_SUBTYPES = 3


# --------------------------------------------------------------------------- conditions


class HistogramEncoder(nn.Module):
    """Target histogram -> one cross-attention token: ``[B, bins] -> [B, 1, context_dim]``.

    Two hidden layers with SiLU, as the paper's "MLP with SiLU activations".
    """

    def __init__(self, bins: int = 40, hidden: int = 128, context_dim: int = 64) -> None:
        super().__init__()
        self.bins = int(bins)
        self.mlp = nn.Sequential(nn.Linear(bins, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, context_dim))

    def forward(self, hist: torch.Tensor) -> torch.Tensor:
        if hist.ndim != 2 or hist.shape[1] != self.bins:
            raise ValueError(f"histogram encoder takes [B, {self.bins}], got {tuple(hist.shape)}")
        return self.mlp(hist.float())[:, None, :]


def mask_to_latent(mask: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """Voxel mask [B, K, D, H, W] -> latent grid [B, K, D/f, H/f, W/f] by max-pooling (any voxel counts):
    the shared LAND-Mask map (:func:`lungsynth.nn.conditioning.mask_to_latent_grid`), in float."""
    from lungsynth.nn.conditioning import mask_to_latent_grid

    return mask_to_latent_grid(mask.float(), factor)


class HrLdmNet(nn.Module):
    """The denoiser with its histogram encoder.

    ``forward(x [B, c + 3, l, l, l], t [B], hist [B, bins], subtype [B]) -> eps [B, c, l, l, l]``
    where ``x`` is ``z~_t`` concatenated with the latent-grid 3-channel mask.
    """

    def __init__(self, spec: Mapping[str, Any]) -> None:
        super().__init__()
        from lungsynth.nn.unets import diffusion_unet

        self.spec = dict(spec)
        c = int(spec["latent_channels"])
        self.hist_encoder = HistogramEncoder(int(spec["hist_bins"]), int(spec["hist_hidden"]),
                                             int(spec["context_dim"]))
        self.unet = diffusion_unet(3, c + MASK_CHANNELS, c, channels=tuple(spec["unet_channels"]),
                                   num_res_blocks=int(spec["num_res_blocks"]),
                                   attention_levels=tuple(bool(a) for a in spec["attention_levels"]),
                                   cross_attention_dim=int(spec["context_dim"]), num_class_embeds=NUM_SUBTYPES)

    def forward(self, x: torch.Tensor, t: torch.Tensor, hist: torch.Tensor, subtype: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, context=self.hist_encoder(hist), class_labels=subtype.long())


def net_spec(cfg: Any, latent_channels: int) -> dict[str, Any]:
    """What shapes the weights (stored as the checkpoint config)."""
    h = cfg.hr_ldm
    return {"latent_channels": int(latent_channels), "unet_channels": list(h.unet_channels),
            "num_res_blocks": int(h.num_res_blocks), "attention_levels": [bool(a) for a in h.attention_levels],
            "context_dim": int(h.context_dim), "hist_hidden": int(h.hist_hidden), "hist_bins": int(h.hist_bins)}


def crop_side(cfg: Any, vae_factor: int = 4) -> int:
    """Crop side the model works on: ``cfg.data.crop_size`` rounded up so the latent side divides the
    U-Net's ``2 ** (levels - 1)`` (smoke 32 -> 32, full 90 -> 96)."""
    m = vae_factor * 2 ** (len(cfg.hr_ldm.unet_channels) - 1)
    return int(-(-int(cfg.data.crop_size) // m) * m)


def make_schedulers(cfg: Any):
    """(training scheduler, sampling scheduler): scaled-linear betas ``beta_start..beta_end``, T steps,
    epsilon prediction; sampling uses ``cfg.hr_ldm.sampler`` (ddpm | ddim)."""
    from lungsynth.diffusion.schedules import make_scheduler

    h = cfg.hr_ldm
    kw = dict(beta_start=h.beta_start, beta_end=h.beta_end)
    train = make_scheduler("ddpm", h.num_train_timesteps, "scaled_linear", "epsilon", **kw)
    if h.sampler not in ("ddpm", "ddim"):
        raise ValueError(f"hr_ldm.sampler must be 'ddpm' or 'ddim', got {h.sampler!r}")
    clip = float(h.clip_latent)
    sample = make_scheduler(h.sampler, h.num_train_timesteps, "scaled_linear", "epsilon", clip_sample=clip > 0,
                            clip_sample_range=(-clip, clip), **kw)
    return train, sample


# --------------------------------------------------------------------------- truncated decoder


class TruncatedDecoder(nn.Module):
    """A frozen copy of the VAE decoder that stops after its penultimate residual block.

    ``forward(z_unscaled [B, c, l, l, l]) -> features [B, F, l*u, ...]`` (u = the upsamplings before
    the cut; 2 for the course's 3-level VAE). Gradients flow to the input, never to the weights.
    """

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        decoder = vae.net.decoder
        blocks = list(decoder.blocks)
        res = [i for i, b in enumerate(blocks) if "ResBlock" in type(b).__name__]
        if len(res) < 2:
            raise ValueError("the VAE decoder has fewer than two residual blocks; cannot truncate it")
        self.blocks = copy.deepcopy(nn.Sequential(*blocks[:res[-2] + 1]))
        self.blocks.eval().requires_grad_(False)
        self.scale_factor = float(vae.scale_factor)

    def train(self, mode: bool = True) -> "TruncatedDecoder":  # always frozen, GroupNorm has no running stats
        return super().train(False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(z)


# --------------------------------------------------------------------------- latent cache


def unit_to_hu(x: torch.Tensor | np.ndarray, cfg: Any) -> torch.Tensor | np.ndarray:
    """The prepared data's [0, 1] scale back to HU (hu_min + x (hu_max - hu_min))."""
    lo, hi = float(cfg.data.hu_min), float(cfg.data.hu_max)
    return lo + x * (hi - lo)


def hu_to_unit(x: torch.Tensor | np.ndarray, cfg: Any) -> torch.Tensor | np.ndarray:
    lo, hi = float(cfg.data.hu_min), float(cfg.data.hu_max)
    if torch.is_tensor(x):
        return ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


class LatentCache(torch.utils.data.Dataset):
    """Nodule crops encoded once by the frozen VAE (it never changes, so encoding every step is waste).

    Items: ``z0`` [c, l, l, l] (posterior mean x scale factor), ``mask`` [1, l, l, l] (binary nodule
    channel, the M of eq. 3), ``cond`` [3, l, l, l] (max-pooled hrmask), ``feat_weight`` [1, *Sf]
    (the nodule's share of each truncated-decoder feature voxel, for eq. 6), ``hist`` [bins] (HU
    histogram of the crop's nodule), ``subtype`` (long).
    """

    def __init__(self, items: list[dict[str, torch.Tensor]]) -> None:
        if not items:
            raise ValueError("the HR-LDM latent cache is empty: the crop dataset has no nodules")
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]

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
    """Encode crop items (``CropDataset`` items: ct [1,C,C,C] in [0,1], hrmask [3,C,C,C], subtype_id)."""
    side = crop_side(cfg, vae.downsample)
    dev = next(vae.parameters()).device
    items: list[dict[str, torch.Tensor]] = []
    pending: list[Mapping[str, Any]] = []

    def flush() -> None:
        ct = torch.stack([torch.as_tensor(p["ct"]).float() for p in pending]).to(dev)
        hr = torch.stack([torch.as_tensor(p["hrmask"]).float() for p in pending]).to(dev)
        z0 = vae.encode_latent(ct, sample=False)
        cond = mask_to_latent(hr, vae.downsample)
        feat_shape = trunc(z0[:1] / vae.scale_factor).shape[2:]
        fw = F.adaptive_avg_pool3d(hr[:, :1], feat_shape)
        hu = unit_to_hu(ct, cfg)
        for j, p in enumerate(pending):
            items.append({"z0": z0[j].cpu(), "mask": (cond[j, :1] > 0).float().cpu(), "cond": cond[j].cpu(),
                          "feat_weight": fw[j].cpu(),
                          "hist": torch.from_numpy(hu_histogram(hu[j, 0], hr[j, 0], cfg.hr_ldm.hist_bins,
                                                                tuple(cfg.hr_ldm.hist_range_hu))).float(),
                          "subtype": validate_subtype(int(p["subtype_id"]))[0]})
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
    """Algorithm 1 as an engine task (module docstring, eq. 3-8)."""

    kind = KIND

    def __init__(self, net: HrLdmNet, scheduler, trunc: TruncatedDecoder | None, hist_weight: float,
                 hist_bins: int = 40, hist_timestep_weighting: str = "none") -> None:
        self.net = net
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
                             hist_timestep_weighting=self.hist_timestep_weighting)


def hr_ldm_losses(net: HrLdmNet, scheduler, batch: Mapping[str, torch.Tensor], trunc: TruncatedDecoder | None,
                  hist_weight: float, hist_bins: int = 40, timesteps: torch.Tensor | None = None,
                  noise: torch.Tensor | None = None, hist_timestep_weighting: str = "none") -> dict[str, torch.Tensor]:
    """Eq. 3-8 for one batch of the latent cache; ``trunc=None`` or ``hist_weight=0`` is the
    MAISI-DDPM baseline (no histogram term). Returns ``loss``, ``loss_eps`` and (when on) ``loss_hist``
    (the unweighted mean JSD).

    ``hist_timestep_weighting``: "none" is eq. 8 as printed; "alpha_bar" multiplies each sample's
    JSD by alpha_bar_t. z0_hat (eq. 5) divides by sqrt(alpha_bar_t), so at large t the histogram
    gradient on eps is amplified up to ~15x and, at lambda_hist = 10, stops eps from being learned in
    short runs (the L1 stays at 0.8, that of predicting zero); weighting by alpha_bar_t keeps the
    term where z0_hat is informative.
    """
    if hist_timestep_weighting not in ("none", "alpha_bar"):
        raise ValueError(f"hist_timestep_weighting must be 'none' or 'alpha_bar', got {hist_timestep_weighting!r}")
    from lungsynth.diffusion.objectives import add_noise_masked, masked_l1, x0_from_eps
    from lungsynth.diffusion.schedules import alpha_bar_at, sample_timesteps

    z0, m = batch["z0"], batch["mask"]
    B = z0.shape[0]
    t = timesteps if timesteps is not None else sample_timesteps(B, scheduler.num_train_timesteps, device=z0.device)
    eps = noise if noise is not None else torch.randn_like(z0)
    zt = add_noise_masked(scheduler, z0, eps, t, m)  # eq. 3: noise only inside the lesion
    eps_hat = net(torch.cat([zt, batch["cond"]], dim=1), t, batch["hist"], batch["subtype"])
    loss_eps = masked_l1(eps_hat, eps, m)  # eq. 4, normalised by the mask sum
    out: dict[str, torch.Tensor] = {"loss_eps": loss_eps}
    loss = loss_eps
    if trunc is not None and hist_weight > 0:
        ab = alpha_bar_at(scheduler, t, like=z0)
        z0_hat = m * x0_from_eps(zt.float(), eps_hat.float(), ab) + (1.0 - m) * z0  # eq. 5
        f_pred = trunc(z0_hat / trunc.scale_factor)
        with torch.no_grad():
            f_true = trunc(z0 / trunc.scale_factor)
        hp, ht = feature_histograms(f_pred.float(), f_true.float(), batch["feat_weight"], hist_bins)  # eq. 6
        jsd = js_divergence(hp, ht)  # eq. 7, [B, ...]
        out["loss_hist"] = jsd.mean()
        w = ab.reshape((B,) + (1,) * (jsd.ndim - 1)) if hist_timestep_weighting == "alpha_bar" else 1.0
        loss = loss + hist_weight * (w * jsd).mean()  # eq. 8
    out["loss"] = loss
    return out


def conditions(subtype: int | Iterable[int] | torch.Tensor, hist: Any, batch: int, bins: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated (subtype [B] long, hist [B, bins]) broadcast to ``batch``."""
    y = validate_subtype(subtype)
    h = validate_histogram(hist, bins)
    if y.shape[0] == 1:
        y = y.expand(batch)
    if h.shape[0] == 1:
        h = h.expand(batch, -1)
    if y.shape[0] != batch or h.shape[0] != batch:
        raise ValueError(f"{y.shape[0]} subtypes and {h.shape[0]} histograms for a batch of {batch}")
    return y, h


def run_name(hist_loss: bool) -> str:
    """``05_hr_ldm_hist`` (HR-LDM) or ``05_hr_ldm_nohist`` (the MAISI-DDPM ablation)."""
    return "05_hr_ldm_hist" if hist_loss else "05_hr_ldm_nohist"


def default_run_dir(cfg: Any, hist_loss: bool = True) -> Path:
    from lungsynth import paths

    return paths.run_dir(cfg.profile, run_name(hist_loss))
