"""How far a denoiser's one-step estimate of x0 is from the truth, noise level by noise level.

A sampler starts at high noise, where the denoiser's estimate of x0 lays out the whole image. If that
estimate is worse than predicting the data mean, the first reverse steps draw structure that no later step
removes: the samples are textures. The loss does not show it: under epsilon-prediction the error of the
estimate is ``(1 - ab) / ab`` times the epsilon error (about 3400x at t = 900 of a linear schedule), so a
small, flat epsilon loss can hide an x0 estimate 60x worse than the mean (chapter 04, measured).

:func:`relative_x0_error` is that check: ``E||x0_hat - x0||^2 / E||x0 - mean||^2`` at given timesteps. A
value near 1 at high noise is what a model that cannot yet tell images apart should give (the mean is the
best guess there); well above 1 is broken sampling; it falls towards 0 as t falls.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from lungsynth.diffusion.objectives import predicted_x0
from lungsynth.diffusion.schedules import add_noise, alpha_bar_at


@torch.no_grad()
def relative_x0_error(denoise_fn: Callable[..., torch.Tensor], scheduler: Any, x0: torch.Tensor,
                      timesteps: Sequence[int], *, condition: Mapping[str, Any] | None = None,
                      seed: int = 0) -> dict[int, float]:
    """``{t: E||x0_hat - x0||^2 / E||x0 - mean(x0)||^2}`` of ``denoise_fn`` on clean samples x0 [B, C, *S].

    ``denoise_fn(x_t, t, **kw)`` returns the scheduler's ``prediction_type``; ``condition`` as for
    :func:`lungsynth.diffusion.samplers.sample` (``"concat"`` channels are appended to x_t, the other keys
    are passed on). The noise is drawn from ``seed``, the same for every t; the mean is over batch and
    space, per channel.
    """
    cond = dict(condition or {})
    concat = cond.pop("concat", None)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(int(seed))).to(x0)
    spread = ((x0 - x0.mean(dim=[d for d in range(x0.ndim) if d != 1], keepdim=True)) ** 2).mean()
    out = {}
    for t in timesteps:
        tt = torch.full((x0.shape[0],), int(t), dtype=torch.long, device=x0.device)
        x_t = add_noise(scheduler, x0, noise, tt)
        inp = x_t if concat is None else torch.cat([x_t, concat.to(x_t)], dim=1)
        pred = denoise_fn(inp, tt, **cond).float()
        est = predicted_x0(scheduler.prediction_type, pred, x_t, alpha_bar_at(scheduler, tt, like=x0))
        out[int(t)] = float(((est - x0) ** 2).mean() / spread)
    return out
