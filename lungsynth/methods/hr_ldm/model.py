"""HR-LDM's networks, conditions and loss (the paper's Sec. 3.2 and Algorithm 1).

Equation numbers are those of the paper (Kannan et al., "Controllable Lung Nodule Synthesis via
Histogram-Regularized Latent Diffusion Models", arXiv:2605.30631v1).

Conditions (paper, Sec. 3.2.1), each checked here before it reaches the network:

- subtype ``y`` in {0 solid, 1 part-solid, 2 ground-glass}: a learned embedding added to the time
  embedding (MONAI ``DiffusionModelUNet(num_class_embeds=3)`` does exactly ``emb = t_emb + E[y]``);
- target HU histogram ``h`` (40 bins over [-1000, 400] HU): ``c_hist = MLP_SiLU(h)`` (eq. 3) is one
  context token for cross-attention;
- multi-channel nodule mask (nodule, solid core, ground-glass part) max-pooled x4 to the latent grid
  and concatenated to ``z_t``.

Algorithm 1, one step (``M`` = nodule mask on the latent grid):

    z_t   = sqrt(ab_t) z_0 + sqrt(1 - ab_t) eps                                         (eq. 1)
    z~_t  = (1 - M) z_0 + M z_t                                                          (eq. 4)
    L_eps = sum |M (eps - eps_theta(z~_t, t, y, h, mask))|_1 / (sum M + delta)          (eq. 5)
    z^_0  = M (z~_t - sqrt(1 - ab_t) eps_theta) / sqrt(ab_t) + (1 - M) z_0                (eq. 6)
    L_hist = JSD(H(D'(z^_0)), H(D'(z_0)))   D' = frozen post_quant_conv + decoder to its penultimate res block,
                                             H = soft histogram over the lesion        (eq. 7-8)
    L = L_eps + lambda_hist L_hist,  lambda_hist = 10                                   (eq. 9)

with scaled-linear betas 0.0015..0.0195 over T = 1000 and polynomial LR decay (engine).

The histograms: the hard HU histogram (condition and metric), the differentiable soft histogram
with a triangular kernel (the regulariser), Jensen-Shannon divergence, and the checks every
condition goes through.

Notation (paper, Sec. 3.2.3): K bins of width ``Delta`` and centres
``c_k = lo + (k + 1/2) Delta``; a value x contributes ``w_k(x) = max(0, 1 - |x - c_k| / Delta)`` to
bin k (a triangular kernel: linear interpolation between the two nearest centres, so the weights of
one value sum to 1); ``h_k = sum_i m_i w_k(x_i) / sum_i m_i`` with lesion weights ``m_i`` (eq. 7).
``JSD(p, q) = 1/2 KL(p || r) + 1/2 KL(q || r)``, ``r = (p + q) / 2`` (natural log: 0 <= JSD <= ln 2;
eq. 8).
"""

from __future__ import annotations

import copy
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

SUBTYPES: tuple[str, ...] = ("solid", "part-solid", "ground-glass")
HIST_BINS = 40
HIST_RANGE_HU: tuple[float, float] = (-1000.0, 400.0)
KIND = "hr_ldm"
MASK_CHANNELS = 3  # hrmask: nodule, solid core, ground-glass part
NUM_SUBTYPES = 3


# --------------------------------------------------------------------------- validation


def validate_subtype(subtype: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Subtype id(s) as LongTensor [B]; anything outside {0 solid, 1 part-solid, 2 ground-glass} is an error."""
    t = torch.as_tensor(subtype)
    if t.is_floating_point() and not torch.equal(t, t.round()):
        raise ValueError(f"subtype must be an integer id 0 (solid), 1 (part-solid) or 2 (ground-glass), got {subtype!r}")
    t = t.long().reshape(-1)
    bad = [int(v) for v in t.tolist() if v not in (0, 1, 2)]
    if bad:
        raise ValueError(f"subtype {bad[0]} is not valid: use 0 (solid), 1 (part-solid) or 2 (ground-glass)")
    return t


def validate_histogram(hist: np.ndarray | torch.Tensor | Sequence[float], bins: int = HIST_BINS,
                       atol: float = 1e-3) -> torch.Tensor:
    """A target histogram as float32 [B, bins]: ``bins`` non-negative values per row summing to 1.

    Raises ValueError for the wrong number of bins, negative or non-finite entries, or rows that do
    not sum to 1 (within ``atol``); build one with :func:`hu_histogram`.
    """
    h = torch.as_tensor(np.asarray(hist, dtype=np.float32) if not torch.is_tensor(hist) else hist).float()
    if h.ndim == 1:
        h = h[None]
    if h.ndim != 2 or h.shape[1] != bins:
        raise ValueError(f"target histogram has shape {tuple(h.shape)}; expected {bins} bins over HU "
                         f"[{HIST_RANGE_HU[0]:.0f}, {HIST_RANGE_HU[1]:.0f}] (shape [{bins}] or [B, {bins}]); "
                         f"build one with hr_ldm.hu_histogram(hu, mask)")
    if not torch.isfinite(h).all() or (h < 0).any():
        raise ValueError("target histogram has negative or non-finite entries; it must be a probability vector")
    sums = h.sum(dim=1)
    if ((sums - 1.0).abs() > atol).any():
        raise ValueError(f"target histogram sums to {sums.tolist()} instead of 1; normalise it (h / h.sum())")
    return h


def validate_mask_in_lung(mask: np.ndarray | torch.Tensor, lung: np.ndarray | torch.Tensor,
                          min_inside: float = 1.0, what: str = "nodule mask") -> None:
    """Raise ValueError when less than ``min_inside`` of the (binary) ``mask`` lies inside ``lung``.

    Both are arrays of the same spatial shape (a leading channel axis of the mask is reduced with any).
    """
    m = np.asarray(torch.as_tensor(mask).cpu().numpy() if torch.is_tensor(mask) else mask) > 0
    lu = np.asarray(torch.as_tensor(lung).cpu().numpy() if torch.is_tensor(lung) else lung) > 0
    if m.ndim == lu.ndim + 1:
        m = m.any(axis=0)
    if m.shape != lu.shape:
        raise ValueError(f"{what} of shape {m.shape} does not match the lung mask {lu.shape}")
    n = int(m.sum())
    if n == 0:
        raise ValueError(f"{what} is empty; give at least one nodule voxel")
    inside = float((m & lu).sum()) / n
    if inside < min_inside - 1e-9:
        raise ValueError(f"{what} lies {100 * (1 - inside):.1f}% outside the lung; place the nodule inside the "
                         f"lung mask (e.g. a centre from hr_ldm.sample_centre) or pass subpleural=True for "
                         f"sub-pleural nodules")


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


# --------------------------------------------------------------------------- histograms


def hu_histogram(hu: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor | None = None,
                 bins: int = HIST_BINS, hu_range: tuple[float, float] = HIST_RANGE_HU) -> np.ndarray:
    """Normalised hard HU histogram of the voxels where ``mask`` > 0 (all voxels when None).

    Values outside ``hu_range`` are clipped into the edge bins. Returns float64 [bins] summing to 1
    (raises ValueError for an empty mask).
    """
    a = hu.detach().cpu().numpy() if torch.is_tensor(hu) else np.asarray(hu)
    if mask is not None:
        m = mask.detach().cpu().numpy() if torch.is_tensor(mask) else np.asarray(mask)
        a = a[np.broadcast_to(m > 0, a.shape)]
    a = np.clip(a.astype(np.float64).ravel(), hu_range[0], hu_range[1])
    if a.size == 0:
        raise ValueError("hu_histogram: the mask selects no voxel")
    h, _ = np.histogram(a, bins=bins, range=hu_range)
    return h / h.sum()


def bin_centres(bins: int = HIST_BINS, value_range: tuple[float, float] = HIST_RANGE_HU) -> np.ndarray:
    """Centres ``c_k`` of ``bins`` equal bins over ``value_range`` (for plots)."""
    lo, hi = value_range
    width = (hi - lo) / bins
    return lo + width * (np.arange(bins) + 0.5)


def soft_histogram(values: torch.Tensor, weights: torch.Tensor | None = None, bins: int = HIST_BINS,
                   value_range: tuple[float, float] = (0.0, 1.0), eps: float = 1e-8) -> torch.Tensor:
    """Differentiable histogram with a triangular kernel (module docstring).

    Args:
        values: [N] or [B, N]. Values are clamped to [c_0, c_{K-1}] so every one counts.
        weights: None or the same shape (lesion weights m_i >= 0, soft masks allowed).
        bins: K. value_range: (lo, hi).
    Returns:
        [K] or [B, K], each row summing to 1 (an all-zero weight row gives the uniform histogram).
    """
    squeeze = values.ndim == 1
    v = values[None] if squeeze else values
    w = torch.ones_like(v) if weights is None else (weights[None] if squeeze else weights).to(v.dtype)
    if w.shape != v.shape:
        raise ValueError(f"soft_histogram: weights {tuple(w.shape)} do not match values {tuple(v.shape)}")
    lo, hi = float(value_range[0]), float(value_range[1])
    width = (hi - lo) / bins
    centres = torch.linspace(lo + width / 2, hi - width / 2, bins, device=v.device, dtype=v.dtype)
    x = v.clamp(centres[0].item(), centres[-1].item())
    kernel = (1.0 - (x[..., None] - centres).abs() / width).clamp_min(0.0)  # [B, N, K]
    h = (kernel * w[..., None]).sum(dim=1) + eps
    h = h / h.sum(dim=1, keepdim=True)
    return h[0] if squeeze else h


def js_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Jensen-Shannon divergence (natural log) between histograms over the last axis: [..., K] -> [...].

    Both are renormalised after adding ``eps`` (so empty bins have finite gradients); 0 for equal
    histograms, at most ln 2.
    """
    if p.shape != q.shape:
        raise ValueError(f"js_divergence: shapes {tuple(p.shape)} and {tuple(q.shape)} differ")
    p = (p + eps) / (p + eps).sum(dim=-1, keepdim=True)
    q = (q + eps) / (q + eps).sum(dim=-1, keepdim=True)
    r = 0.5 * (p + q)
    kl_pr = (p * (p.log() - r.log())).sum(dim=-1)
    kl_qr = (q * (q.log() - r.log())).sum(dim=-1)
    return (0.5 * (kl_pr + kl_qr)).clamp_min(0.0)


def js_divergence_np(p: np.ndarray, q: np.ndarray) -> float:
    """:func:`js_divergence` of two NumPy histograms [K] in **bits** (in [0, 1]), the unit of every JSD the course
    reports (chapter 09's board included); the training loss stays in nats, a constant factor ln 2."""
    nats = js_divergence(torch.as_tensor(p, dtype=torch.float64), torch.as_tensor(q, dtype=torch.float64))
    return float(nats) / float(np.log(2.0))


def feature_histograms(feat_pred: torch.Tensor, feat_true: torch.Tensor, weights: torch.Tensor,
                       bins: int = HIST_BINS) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft histograms of decoder features inside the lesion, for the JSD regulariser.

    Decoder features have no fixed range, so both are mapped by ``sigmoid((f - mu) / sd)`` with the
    ground truth's lesion mean and std (detached) and binned on [0, 1]: the same map for both keeps
    the comparison fair and every value differentiable.

    Args:
        feat_pred, feat_true: [B, F, *S] features of the truncated decoder (prediction, ground truth).
        weights: [B, 1, *S] lesion weights at the feature grid (soft allowed).
    Returns:
        (h_pred, h_true), each [B, bins]; only lesion voxels enter (per-sample loop).
    """
    hp, ht = [], []
    for b in range(feat_pred.shape[0]):
        w = weights[b].expand_as(feat_true[b]).reshape(-1)
        keep = w > 0
        if not bool(keep.any()):
            keep = torch.ones_like(keep)
            w = torch.ones_like(w)
        ft = feat_true[b].reshape(-1)[keep].detach()
        fp = feat_pred[b].reshape(-1)[keep]
        wk = w[keep]
        mu = (ft * wk).sum() / wk.sum()
        sd = (((ft - mu) ** 2 * wk).sum() / wk.sum()).sqrt().clamp_min(1e-4)
        hp.append(soft_histogram(torch.sigmoid((fp - mu) / sd), wk, bins))
        ht.append(soft_histogram(torch.sigmoid((ft - mu) / sd), wk, bins))
    return torch.stack(hp), torch.stack(ht)


# --------------------------------------------------------------------------- networks: condition encoding, denoiser


class HistogramEncoder(nn.Module):
    """Target histogram -> one cross-attention token: ``[B, bins] -> [B, 1, context_dim]``.

    ``hidden_layers=1`` is eq. 3 as printed, ``W2 SiLU(W1 h + b1) + b2``; more hidden layers (each
    Linear + SiLU of width ``hidden``) are a named option, not the paper's form.
    """

    def __init__(self, bins: int = 40, hidden: int = 128, context_dim: int = 64, hidden_layers: int = 1) -> None:
        super().__init__()
        if int(hidden_layers) < 1:
            raise ValueError(f"the histogram MLP needs at least one hidden layer (eq. 3 has one), got {hidden_layers}")
        self.bins = int(bins)
        layers: list[nn.Module] = [nn.Linear(bins, hidden), nn.SiLU()]
        for _ in range(int(hidden_layers) - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(hidden, context_dim))

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
                                             int(spec["context_dim"]), int(spec.get("hist_layers", 1)))
        self.unet = diffusion_unet(3, c + MASK_CHANNELS, c, channels=tuple(spec["unet_channels"]),
                                   num_res_blocks=int(spec["num_res_blocks"]),
                                   attention_levels=tuple(bool(a) for a in spec["attention_levels"]),
                                   cross_attention_dim=int(spec["context_dim"]), num_class_embeds=NUM_SUBTYPES)

    def forward(self, x: torch.Tensor, t: torch.Tensor, hist: torch.Tensor, subtype: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, context=self.hist_encoder(hist), class_labels=subtype.long())


def net_spec(cfg: Any, latent_channels: int) -> dict[str, Any]:
    """What shapes the weights and what they regress (stored as the checkpoint config)."""
    from lungsynth.diffusion.schedules import canonical_prediction_type

    h = cfg.hr_ldm
    return {"latent_channels": int(latent_channels), "unet_channels": list(h.unet_channels),
            "num_res_blocks": int(h.num_res_blocks), "attention_levels": [bool(a) for a in h.attention_levels],
            "context_dim": int(h.context_dim), "hist_hidden": int(h.hist_hidden), "hist_bins": int(h.hist_bins),
            "hist_layers": int(h.hist_layers), "prediction": canonical_prediction_type(h.prediction)}


def crop_side(cfg: Any, vae_factor: int = 4) -> int:
    """Crop side the model works on: ``cfg.data.crop_size`` rounded up so the latent side divides the
    U-Net's ``2 ** (levels - 1)`` (smoke 32 -> 32, full 90 -> 96)."""
    m = vae_factor * 2 ** (len(cfg.hr_ldm.unet_channels) - 1)
    return int(-(-int(cfg.data.crop_size) // m) * m)


def make_schedulers(cfg: Any, prediction: str | None = None):
    """(training scheduler, sampling scheduler): scaled-linear betas ``beta_start..beta_end``, T steps, the
    prediction type ``prediction`` (default ``cfg.hr_ldm.prediction``; a checkpoint passes what it was trained
    on); sampling uses ``cfg.hr_ldm.sampler`` (ddpm | ddim)."""
    from lungsynth.diffusion.schedules import make_scheduler

    h = cfg.hr_ldm
    pred = prediction or h.prediction
    kw = dict(beta_start=h.beta_start, beta_end=h.beta_end)
    train = make_scheduler("ddpm", h.num_train_timesteps, "scaled_linear", pred, **kw)
    if h.sampler not in ("ddpm", "ddim"):
        raise ValueError(f"hr_ldm.sampler must be 'ddpm' or 'ddim', got {h.sampler!r}")
    clip = float(h.clip_latent)
    sample = make_scheduler(h.sampler, h.num_train_timesteps, "scaled_linear", pred, clip_sample=clip > 0,
                            clip_sample_range=(-clip, clip), **kw)
    return train, sample


# --------------------------------------------------------------------------- truncated decoder


class TruncatedDecoder(nn.Module):
    """A frozen copy of the VAE's decoding up to its penultimate residual block (Sec. 3.2.3, after Berrada et al.).

    ``forward(z_unscaled [B, c, l, l, l]) -> features [B, F, l*u, l*u, l*u]``: the ``post_quant_conv`` that
    ``AutoencoderKL.decode`` applies first, then the decoder's blocks up to and including its penultimate
    residual block. As the paper says, the final convolution and the last upsampling are skipped: with the
    course's decoder (one residual block a level) the features are at half the voxel grid, ``u``
    (``self.upsamplings``) = 2 of the 4 and F = the last level's input width. Cutting one block later (at the
    voxel grid) cost 4.7 s a course training step instead of 2.05 (measured, 2 cores, fp32). Gradients flow to
    the input, never to the weights; a test checks the output against the real ``decode`` through a forward hook.
    """

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        net = vae.net
        blocks = list(net.decoder.blocks)
        res = [i for i, b in enumerate(blocks) if "ResBlock" in type(b).__name__]
        if len(res) < 2:
            raise ValueError("the VAE decoder has fewer than two residual blocks; cannot truncate it")
        self.cut = res[-2]  # index of the decoder block whose output is the feature map
        self.post_quant_conv = copy.deepcopy(net.post_quant_conv)
        self.blocks = copy.deepcopy(nn.Sequential(*blocks[:self.cut + 1]))
        self.upsamplings = 2 ** sum("upsample" in type(b).__name__.lower() for b in blocks[:self.cut + 1])
        self.eval().requires_grad_(False)
        self.scale_factor = float(vae.scale_factor)

    def train(self, mode: bool = True) -> "TruncatedDecoder":  # always frozen, GroupNorm has no running stats
        return super().train(False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.post_quant_conv(z))


# --------------------------------------------------------------------------- the [0, 1] scale and HU


def unit_to_hu(x: torch.Tensor | np.ndarray, cfg: Any) -> torch.Tensor | np.ndarray:
    """The prepared data's [0, 1] scale back to HU (hu_min + x (hu_max - hu_min))."""
    lo, hi = float(cfg.data.hu_min), float(cfg.data.hu_max)
    return lo + x * (hi - lo)


def hu_to_unit(x: torch.Tensor | np.ndarray, cfg: Any) -> torch.Tensor | np.ndarray:
    lo, hi = float(cfg.data.hu_min), float(cfg.data.hu_max)
    if torch.is_tensor(x):
        return ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


# --------------------------------------------------------------------------- Algorithm 1: the loss


INPAINT_DELTA = 1e-6  # eq. 5's smoothing constant


def inpaint_l1(eps_hat: torch.Tensor, eps: torch.Tensor, mask: torch.Tensor, delta: float = INPAINT_DELTA,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 5 per sample, averaged over the batch: ``sum |M (eps - eps_hat)|_1 / (sum M + delta)``.

    Shapes: ``eps_hat``, ``eps`` [B, c, *S]; ``mask`` [B, 1, *S] (the lesion M on the latent grid). The
    channel choice: ``|.|_1`` is the L1 norm over the c latent channels of each latent voxel and ``sum M``
    counts latent voxels, so the loss is per lesion voxel (c times a per-element mean; lambda_hist = 10
    weighs the histogram term against this scale). ``weight`` [B, 1, *S] (optional, a departure): each latent
    voxel counts ``weight`` times in both sums, so the loss stays a weighted mean per lesion voxel.
    """
    if mask.shape[1] != 1 or mask.shape[0] != eps.shape[0] or mask.shape[2:] != eps.shape[2:]:
        raise ValueError(f"eq. 5 takes a one-channel mask [B, 1, *S] matching eps {tuple(eps.shape)}, "
                         f"got {tuple(mask.shape)}")
    w = mask.float() if weight is None else mask.float() * weight.float()
    err = (w * (eps.float() - eps_hat.float())).abs().flatten(1).sum(dim=1)
    return (err / (w.flatten(1).sum(dim=1) + delta)).mean()



def hr_ldm_losses(net: HrLdmNet, scheduler, batch: Mapping[str, torch.Tensor], trunc: TruncatedDecoder | None,
                  hist_weight: float, hist_bins: int = 40, timesteps: torch.Tensor | None = None,
                  noise: torch.Tensor | None = None, hist_timestep_weighting: str = "none",
                  nodule_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Eq. 4-9 for one batch of the latent cache; ``trunc=None`` or ``hist_weight=0`` is the
    MAISI-DDPM baseline (no histogram term). Returns ``loss``, ``loss_eps`` and (when on) ``loss_hist``
    (the unweighted mean JSD). ``nodule_weight`` (1: eq. 5 as printed) weighs each latent voxel of eq. 5 by
    ``1 + (w - 1) x batch["nodule_share"]``.

    ``hist_timestep_weighting``: "none" is eq. 9 as printed; "alpha_bar" multiplies each sample's
    JSD by alpha_bar_t. z0_hat (eq. 6) divides by sqrt(alpha_bar_t), so at large t the histogram
    gradient on eps is amplified up to ~15x and, at lambda_hist = 10, stops eps from being learned in
    short runs (the L1 stays at 0.8, that of predicting zero); weighting by alpha_bar_t keeps the
    term where z0_hat is informative.
    """
    if hist_timestep_weighting not in ("none", "alpha_bar"):
        raise ValueError(f"hist_timestep_weighting must be 'none' or 'alpha_bar', got {hist_timestep_weighting!r}")
    from lungsynth.diffusion.objectives import add_noise_masked, predicted_x0, target_for
    from lungsynth.diffusion.schedules import alpha_bar_at, sample_timesteps

    z0, m = batch["z0"], batch["mask"]
    B = z0.shape[0]
    t = timesteps if timesteps is not None else sample_timesteps(B, scheduler.num_train_timesteps, device=z0.device)
    eps = noise if noise is not None else torch.randn_like(z0)
    zt = add_noise_masked(scheduler, z0, eps, t, m)  # eq. 1 and 4: noise only inside the lesion
    out_hat = net(torch.cat([zt, batch["cond"]], dim=1), t, batch["hist"], batch["subtype"])
    # eq. 5: the L1 on eps as printed; with the v target (scheduler.prediction_type) the same masked L1 on v
    # nodule_weight != 1 (a departure): each latent voxel weighs 1 + (w - 1) x the nodule's share of it
    weight = None if nodule_weight == 1.0 else 1.0 + (nodule_weight - 1.0) * batch["nodule_share"]
    loss_eps = inpaint_l1(out_hat, target_for(scheduler, z0, eps, t), m, weight=weight)
    out: dict[str, torch.Tensor] = {"loss_eps": loss_eps}
    loss = loss_eps
    if trunc is not None and hist_weight > 0:
        ab = alpha_bar_at(scheduler, t, like=z0)
        # eq. 6 inside the lesion; outside it z~_t is the clean z_0 itself (eq. 4), which eq. 6 would distort
        # by -sqrt(1 - ab) eps_hat / sqrt(ab): the truncated decoder's receptive field sees the true background
        z0_hat = m * predicted_x0(scheduler.prediction_type, out_hat.float(), zt.float(), ab) + (1.0 - m) * z0
        f_pred = trunc(z0_hat / trunc.scale_factor)
        with torch.no_grad():
            f_true = trunc(z0 / trunc.scale_factor)
        hp, ht = feature_histograms(f_pred.float(), f_true.float(), batch["feat_weight"], hist_bins)  # eq. 7
        jsd = js_divergence(hp, ht)  # eq. 8, [B, ...]
        out["loss_hist"] = jsd.mean()
        w = ab.reshape((B,) + (1,) * (jsd.ndim - 1)) if hist_timestep_weighting == "alpha_bar" else 1.0
        loss = loss + hist_weight * (w * jsd).mean()  # eq. 9
    out["loss"] = loss
    return out
