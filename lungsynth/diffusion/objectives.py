"""Training targets, conversions between parameterisations, Min-SNR-gamma weights, masked losses.

Notation (x_t = sqrt(ab) x0 + sqrt(1 - ab) eps, ab = alpha_bar_t):

- epsilon prediction: target ``eps``;
- v prediction (Salimans & Ho 2022): target ``v = sqrt(ab) eps - sqrt(1 - ab) x0``;
  then ``x0 = sqrt(ab) x_t - sqrt(1 - ab) v`` and ``eps = sqrt(ab) v + sqrt(1 - ab) x_t``;
- x0 prediction (MONAI's ``"sample"``): target ``x0``.

Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"):
the x0-space loss weight is ``min(SNR, gamma)``; expressed in each parameterisation's own loss
(since ||x0 - x0_hat||^2 = ||eps - eps_hat||^2 / SNR = ||v - v_hat||^2 / (SNR + 1)):

- epsilon: ``min(SNR, gamma) / SNR``
- v:       ``min(SNR, gamma) / (SNR + 1)``
- x0:      ``min(SNR, gamma)``

All functions take ``alpha_bar`` as a tensor [B] (one value per sample; see
:func:`lungsynth.diffusion.schedules.alpha_bar_at`) or a Python float, and broadcast it.
"""

from __future__ import annotations

from typing import Literal

import torch

from lungsynth.diffusion.schedules import (add_noise, alpha_bar_at, broadcast_to, canonical_prediction_type,
                                           snr)

LossKind = Literal["l1", "l2", "mse", "huber"]


def _ab(alpha_bar: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    ab = torch.as_tensor(alpha_bar, dtype=torch.float32)
    if ab.ndim == 0:
        ab = ab.expand(like.shape[0])
    if ab.shape[0] != like.shape[0]:
        raise ValueError(f"alpha_bar has {ab.shape[0]} values for a batch of {like.shape[0]}")
    return broadcast_to(ab, like)


# --------------------------------------------------------------------------- targets


def v_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """``v = sqrt(ab) eps - sqrt(1 - ab) x0``; x0, noise [B, C, *S], alpha_bar [B] -> [B, C, *S]."""
    ab = _ab(alpha_bar, x0)
    return ab.sqrt() * noise - (1.0 - ab).sqrt() * x0


def target(prediction_type: str, x0: torch.Tensor, noise: torch.Tensor,
           alpha_bar: torch.Tensor | float | None = None) -> torch.Tensor:
    """The regression target for ``prediction_type`` (epsilon -> noise, v_prediction -> v, sample -> x0).

    ``alpha_bar`` [B] is needed for v only.
    """
    kind = canonical_prediction_type(prediction_type)
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return x0
    if alpha_bar is None:
        raise ValueError("v-prediction targets need alpha_bar at the sampled timesteps")
    return v_target(x0, noise, alpha_bar)


def target_for(scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The target of ``scheduler.prediction_type`` at ``timesteps`` [B]; shapes as :func:`target`."""
    return target(scheduler.prediction_type, x0, noise, alpha_bar_at(scheduler, timesteps, like=x0))


# --------------------------------------------------------------------------- conversions


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """``x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab)``."""
    ab = _ab(alpha_bar, x_t)
    return (x_t - (1.0 - ab).sqrt() * eps) / ab.sqrt()


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """``eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab)``."""
    ab = _ab(alpha_bar, x_t)
    return (x_t - ab.sqrt() * x0) / (1.0 - ab).sqrt()


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """``x0 = sqrt(ab) x_t - sqrt(1 - ab) v``."""
    ab = _ab(alpha_bar, x_t)
    return ab.sqrt() * x_t - (1.0 - ab).sqrt() * v


def eps_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """``eps = sqrt(ab) v + sqrt(1 - ab) x_t``."""
    ab = _ab(alpha_bar, x_t)
    return ab.sqrt() * v + (1.0 - ab).sqrt() * x_t


def v_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """``v`` from an epsilon prediction (via x0)."""
    return v_target(x0_from_eps(x_t, eps, alpha_bar), eps, alpha_bar)


def predicted_x0(prediction_type: str, model_output: torch.Tensor, x_t: torch.Tensor,
                 alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """x0 implied by a model output of any parameterisation; all tensors [B, C, *S]."""
    kind = canonical_prediction_type(prediction_type)
    if kind == "epsilon":
        return x0_from_eps(x_t, model_output, alpha_bar)
    if kind == "v_prediction":
        return x0_from_v(x_t, model_output, alpha_bar)
    return model_output


def predicted_eps(prediction_type: str, model_output: torch.Tensor, x_t: torch.Tensor,
                  alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """epsilon implied by a model output of any parameterisation; all tensors [B, C, *S]."""
    kind = canonical_prediction_type(prediction_type)
    if kind == "epsilon":
        return model_output
    if kind == "v_prediction":
        return eps_from_v(x_t, model_output, alpha_bar)
    return eps_from_x0(x_t, model_output, alpha_bar)


# --------------------------------------------------------------------------- weights


def min_snr_weights(snr_values: torch.Tensor, gamma: float = 5.0, prediction_type: str = "epsilon") -> torch.Tensor:
    """Min-SNR-gamma loss weights per sample (Hang et al. 2023).

    Args:
        snr_values: SNR(t) per sample, [B] (see :func:`lungsynth.diffusion.schedules.snr`).
        gamma: the clamp (paper and LAND: 5).
        prediction_type: epsilon -> ``min(SNR, g)/SNR``; v_prediction -> ``min(SNR, g)/(SNR + 1)``;
            sample -> ``min(SNR, g)``.
    Returns:
        float32 weights [B].
    """
    if gamma <= 0:
        raise ValueError(f"min-SNR gamma must be > 0, got {gamma}")
    s = torch.as_tensor(snr_values, dtype=torch.float64)
    clipped = torch.minimum(s, torch.full_like(s, float(gamma)))
    kind = canonical_prediction_type(prediction_type)
    if kind == "epsilon":
        w = clipped / s
    elif kind == "v_prediction":
        w = clipped / (s + 1.0)
    else:
        w = clipped
    return w.float()


def min_snr_weights_for(scheduler, timesteps: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """:func:`min_snr_weights` for ``scheduler``'s prediction type at ``timesteps`` [B] -> [B]."""
    return min_snr_weights(snr(scheduler, timesteps), gamma, scheduler.prediction_type).to(
        torch.as_tensor(timesteps).device)


# --------------------------------------------------------------------------- noising and losses


def add_noise_masked(scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """Lesion-only noising (HR-LDM): ``x~_t = (1 - M) x0 + M x_t``.

    Args:
        x0, noise: [B, C, *S]; timesteps: [B]; mask: [B, 1 or C, *S] in [0, 1] (1 = noised region).
    Returns:
        [B, C, *S]: noisy inside the mask, clean outside.
    """
    _check_mask(mask, x0)
    x_t = add_noise(scheduler, x0, noise, timesteps)
    m = mask.to(x0.dtype)
    return (1.0 - m) * x0 + m * x_t


def _check_mask(mask: torch.Tensor, like: torch.Tensor) -> None:
    if mask.ndim != like.ndim or mask.shape[0] != like.shape[0] or mask.shape[2:] != like.shape[2:] \
            or mask.shape[1] not in (1, like.shape[1]):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit a tensor of shape {tuple(like.shape)}; "
                         f"expected [B, 1 or C, *spatial] with the same batch and spatial size")


def elementwise_loss(pred: torch.Tensor, target_: torch.Tensor, kind: LossKind = "l2",
                     huber_delta: float = 1.0) -> torch.Tensor:
    """Per-element loss, same shape as the inputs (l1 = |d|, l2/mse = d^2, huber)."""
    if pred.shape != target_.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target_.shape)} differ in shape")
    d = pred.float() - target_.float()
    if kind == "l1":
        return d.abs()
    if kind in ("l2", "mse"):
        return d * d
    if kind == "huber":
        return torch.nn.functional.huber_loss(pred.float(), target_.float(), reduction="none", delta=huber_delta)
    raise ValueError(f"unknown loss kind {kind!r}; use l1, l2 (mse) or huber")


def per_sample_loss(pred: torch.Tensor, target_: torch.Tensor, mask: torch.Tensor | None = None,
                    kind: LossKind = "l2", eps: float = 1e-8) -> torch.Tensor:
    """Loss per sample [B]: the mean over all elements, or, with a mask, the masked sum divided by the
    mask sum (counted over every channel the mask covers). A sample with an empty mask contributes 0.

    Args:
        pred, target_: [B, C, *S]; mask: None or [B, 1 or C, *S], binary or soft in [0, 1].
    """
    # fp32 whatever the network ran in: a bf16 prediction (autocast) keeps 8 mantissa bits, too few
    # for a mean over millions of voxels
    err = elementwise_loss(pred.float(), target_.float(), kind)
    dims = tuple(range(1, err.ndim))
    if mask is None:
        return err.mean(dim=dims)
    _check_mask(mask, err)
    m = mask.to(err.dtype).expand_as(err)
    return (err * m).sum(dim=dims) / m.sum(dim=dims).clamp_min(eps)


def masked_l1(pred: torch.Tensor, target_: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scalar mean over the batch of :func:`per_sample_loss` with L1 (HR-LDM, Lung-DDPM)."""
    return per_sample_loss(pred, target_, mask, "l1").mean()


def masked_mse(pred: torch.Tensor, target_: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scalar mean over the batch of :func:`per_sample_loss` with L2."""
    return per_sample_loss(pred, target_, mask, "l2").mean()


def diffusion_loss(model_output: torch.Tensor, target_: torch.Tensor, weights: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None, kind: LossKind = "l2",
                   check_finite: bool = True) -> torch.Tensor:
    """The one diffusion loss: ``mean_b( w_b * L_b )`` with ``L_b`` from :func:`per_sample_loss`.

    Args:
        model_output, target_: [B, C, *S].
        weights: None (all 1) or [B], e.g. :func:`min_snr_weights_for`.
        mask: None or [B, 1 or C, *S]; the loss is normalised by the mask sum per sample.
        kind: ``l2`` (default, LAND/bbox-LDM/text2img), ``l1`` (HR-LDM, Lung-DDPM) or ``huber``.
        check_finite: raise ValueError on a NaN/inf loss (a diverged step, not a loss); costs one
            device sync per call, so a training loop that checks itself can pass False.
    Returns:
        a scalar float32 tensor.
    """
    per = per_sample_loss(model_output, target_, mask, kind)
    if weights is not None:
        w = torch.as_tensor(weights, dtype=per.dtype, device=per.device).reshape(-1)
        if w.shape[0] != per.shape[0]:
            raise ValueError(f"{w.shape[0]} loss weights for a batch of {per.shape[0]}")
        per = per * w
    loss = per.mean()
    if check_finite and not torch.isfinite(loss.detach()):
        raise ValueError("diffusion loss is not finite (NaN/inf in the model output or target); "
                         "lower the learning rate or check the inputs")
    return loss
