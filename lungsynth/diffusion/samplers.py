"""One reverse-diffusion loop for every method: DDPM or DDIM, guidance, and region hooks.

::

    from lungsynth.diffusion.schedules import make_scheduler
    from lungsynth.diffusion.samplers import sample, BackgroundAnchor

    sched = make_scheduler("ddim", 1000, "linear", "v_prediction")
    x = sample(lambda x, t, **c: unet(x, t, **c), sched, (1, 4, 16, 16, 16), num_inference_steps=50,
               generator=torch.Generator().manual_seed(0),
               condition={"concat": mask_latent, "context": ctx})

``denoise_fn(x_t, t, **condition)`` gets ``x_t`` [B, C(+concat), *S] and ``t`` LongTensor [B] and
returns the model output [B, C, *S] in the scheduler's parameterisation. The special condition key
``"concat"`` is concatenated to ``x_t`` along channels before the call (LAND, Lung-DDPM, bbox-LDM,
HR-LDM masks); the other keys are passed as keyword arguments (``context``, ``class_labels``, ...).

Why the step is written here rather than calling ``scheduler.step``: MONAI 1.6's DDPM step always
steps from t to t-1 (wrong when fewer inference steps than training steps are used), and its DDIM
step goes to ``t - T // n`` while its own ``set_timesteps`` spaces timesteps by ``(T-1)/(n-1)``, so
the sample it returns is at a different noise level from the next timestep it is evaluated at.
:func:`step` takes the previous timestep explicitly and uses the scheduler's ``alphas_cumprod``,
prediction type, clipping and (DDPM) variance type; where MONAI's step is consistent (DDPM with
all T steps, DDIM with ``prev = t - T//n``) the two agree (tests/diffusion/test_samplers.py).

Step callbacks ``cb(x_prev, timestep, prev_timestep, pred_x0) -> x_prev`` run after every step;
one that has an ``on_start(x_T, first_timestep) -> x_T`` method is also applied to the start noise.
:class:`BackgroundAnchor` (HR-LDM re-anchoring) and :func:`anatomically_aware` (Lung-DDPM AAS) are
such callbacks.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Mapping, Sequence

import torch

from lungsynth.diffusion.objectives import predicted_eps, predicted_x0
from lungsynth.diffusion.schedules import add_noise

DenoiseFn = Callable[..., torch.Tensor]
StepCallback = Callable[[torch.Tensor, int, int, torch.Tensor], "torch.Tensor | None"]


# --------------------------------------------------------------------------- small pieces


def scheduler_kind(scheduler) -> str:
    """``"ddim"`` for a MONAI DDIMScheduler, ``"ddpm"`` for a DDPMScheduler; anything else is an error."""
    name = type(scheduler).__name__
    if name == "DDIMScheduler":
        return "ddim"
    if name == "DDPMScheduler":
        return "ddpm"
    raise ValueError(f"sample() supports MONAI DDPMScheduler and DDIMScheduler, got {name}")


Generators = torch.Generator | Sequence[torch.Generator]


def per_sample_generators(seed: int, first: int, n: int) -> list[torch.Generator]:
    """CPU generators of samples ``first .. first + n - 1`` of a run seeded ``seed``, one stream each.

    Passed as ``generator`` to :func:`sample`, they make sample ``i`` the same whether it is drawn
    alone, in a chunk or in one batch with all the others (chunked evaluation depends on it).
    """
    import numpy as np

    return [torch.Generator().manual_seed(int(np.random.SeedSequence([int(seed), int(i)]).generate_state(1)[0]))
            for i in range(int(first), int(first) + int(n))]


def randn(shape: Sequence[int], generator: Generators | None = None, device: torch.device | str | None = None,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (so a CPU generator gives the same numbers
    on any device), then moved to ``device``. A sequence of generators, one per sample (``shape[0]`` of
    them), draws each sample's noise from its own."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != int(shape[0]):
            raise ValueError(f"{len(generator)} generators for a batch of {int(shape[0])}; pass one per sample")
        return torch.stack([randn(tuple(shape)[1:], g, device, dtype) for g in generator])
    gen_device = generator.device if generator is not None else torch.device(device or "cpu")
    out = torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=torch.float32)
    return out.to(device=device or gen_device, dtype=dtype)


def timestep_pairs(scheduler, num_inference_steps: int | None = None) -> list[tuple[int, int]]:
    """``[(t, t_prev), ...]`` from ``scheduler.set_timesteps(n)``; the last pair has ``t_prev = -1``
    (the clean sample). ``None`` means all ``T`` training steps."""
    T = int(scheduler.num_train_timesteps)
    n = T if num_inference_steps is None else int(num_inference_steps)
    if not 1 <= n <= T:
        raise ValueError(f"num_inference_steps must be in 1..{T} for this scheduler, got {num_inference_steps}")
    scheduler.set_timesteps(n)
    ts: list[int] = []
    for t in scheduler.timesteps.tolist():
        t = int(min(max(t, 0), T - 1))
        if not ts or t != ts[-1]:
            ts.append(t)
    return list(zip(ts, ts[1:] + [-1]))


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + s (cond - uncond)``.

    ``s == 1`` returns ``cond`` itself (bit for bit), ``s == 0`` returns ``uncond``.
    """
    if guidance_scale == 1.0 or uncond is None:
        if uncond is None and guidance_scale != 1.0:
            raise ValueError("guidance_scale != 1 needs an unconditional prediction (uncond_condition)")
        return cond
    if guidance_scale == 0.0:
        return uncond
    return uncond + guidance_scale * (cond - uncond)


def _alpha_bar(scheduler, t: int, final: bool) -> float:
    if t >= 0:
        return float(scheduler.alphas_cumprod[t].double())
    if final and scheduler_kind(scheduler) == "ddim":
        return float(torch.as_tensor(scheduler.final_alpha_cumprod).double())
    return 1.0


def step(scheduler, model_output: torch.Tensor, timestep: int, prev_timestep: int, sample_: torch.Tensor,
         generator: Generators | None = None, eta: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One reverse step from ``timestep`` to ``prev_timestep`` (-1 = the clean sample).

    DDPM (Ho et al. 2020, eq. 6-7, with respaced betas ``1 - ab_t/ab_prev`` for strided steps):
    posterior mean of q(x_prev | x_t, x0_hat) plus noise of the scheduler's variance type.
    DDIM (Song et al. 2021, eq. 12, 16): ``sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - s^2) eps_hat + s z``
    with ``s = eta sqrt((1-ab_prev)/(1-ab_t) (1 - ab_t/ab_prev))``.

    Args:
        model_output, sample_: [B, C, *S]. generator: for the DDPM / eta > 0 noise.
    Returns:
        (x_prev, pred_x0), both [B, C, *S] float32.
    """
    kind = scheduler_kind(scheduler)
    x_t = sample_.float()
    out = model_output.float()
    ab_t = _alpha_bar(scheduler, timestep, final=False)
    ab_prev = _alpha_bar(scheduler, prev_timestep, final=True)
    pred_type = scheduler.prediction_type
    x0 = predicted_x0(pred_type, out, x_t, ab_t)
    eps = predicted_eps(pred_type, out, x_t, ab_t)  # from the unclipped x0, as MONAI does
    if getattr(scheduler, "clip_sample", False):
        lo, hi = scheduler.clip_sample_values
        x0 = x0.clamp(float(lo), float(hi))
    if kind == "ddim":
        var = (1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev)
        sigma = float(eta) * max(var, 0.0) ** 0.5
        direction = max(1.0 - ab_prev - sigma**2, 0.0) ** 0.5
        prev = ab_prev**0.5 * x0 + direction * eps
        if sigma > 0:
            prev = prev + sigma * randn(x_t.shape, generator, x_t.device)
        return prev, x0
    # DDPM
    if prev_timestep == timestep - 1 and timestep >= 0:
        beta, alpha = float(scheduler.betas[timestep].double()), float(scheduler.alphas[timestep].double())
    else:
        alpha = ab_t / ab_prev
        beta = 1.0 - alpha
    c_x0 = ab_prev**0.5 * beta / (1.0 - ab_t)
    c_xt = alpha**0.5 * (1.0 - ab_prev) / (1.0 - ab_t)
    prev = c_x0 * x0 + c_xt * x_t
    if prev_timestep >= 0:
        vt = str(scheduler.variance_type)
        if vt == "fixed_small":
            var = max((1.0 - ab_prev) / (1.0 - ab_t) * beta, 1e-20)
        elif vt == "fixed_large":
            var = beta
        else:
            raise ValueError(f"DDPM variance_type {vt!r} (learned variance) is not supported by this sampler")
        prev = prev + var**0.5 * randn(x_t.shape, generator, x_t.device)
    return prev, x0


def _split_condition(condition: Mapping[str, Any] | None) -> tuple[torch.Tensor | None, dict[str, Any]]:
    cond = dict(condition or {})
    return cond.pop("concat", None), cond


def _call(denoise_fn: DenoiseFn, x: torch.Tensor, t: torch.Tensor, condition: Mapping[str, Any] | None) -> torch.Tensor:
    concat, kwargs = _split_condition(condition)
    if concat is not None:
        concat = concat.to(device=x.device, dtype=x.dtype)
        if concat.shape[0] == 1 and x.shape[0] > 1:
            concat = concat.expand(x.shape[0], *concat.shape[1:])
        if concat.shape[0] != x.shape[0] or concat.shape[2:] != x.shape[2:]:
            raise ValueError(f"concat condition of shape {tuple(concat.shape)} does not fit x_t {tuple(x.shape)}: "
                             f"expected [B or 1, K, {', '.join(map(str, x.shape[2:]))}]")
        x = torch.cat([x, concat], dim=1)
    return denoise_fn(x, t, **kwargs)


def _as_callbacks(step_callback: StepCallback | Sequence[StepCallback] | None) -> list[StepCallback]:
    if step_callback is None:
        return []
    if callable(step_callback):
        return [step_callback]
    return list(step_callback)


def _cat_conditions(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    if set(a) != set(b):
        raise ValueError(f"cfg_batch needs the same condition keys, got {sorted(a)} and {sorted(b)}")
    out = {}
    for k in a:
        if not (torch.is_tensor(a[k]) and torch.is_tensor(b[k])):
            raise ValueError(f"cfg_batch needs tensor conditions; {k!r} is not a tensor")
        out[k] = torch.cat([a[k], b[k]], dim=0)
    return out


# --------------------------------------------------------------------------- the loop


def sample(denoise_fn: DenoiseFn, scheduler, shape: Sequence[int], num_inference_steps: int | None = None, *,
           generator: Generators | None = None, device: torch.device | str | None = None,
           x_T: torch.Tensor | None = None, condition: Mapping[str, Any] | None = None,
           uncond_condition: Mapping[str, Any] | None = None, guidance_scale: float = 1.0, cfg_batch: bool = False,
           eta: float = 0.0, step_callback: StepCallback | Sequence[StepCallback] | None = None,
           intermediates_every: int | None = None, amp: bool | str = True, progress: bool = True,
           desc: str = "sampling", stats: dict | None = None
           ) -> torch.Tensor | tuple[torch.Tensor, list[dict[str, Any]]]:
    """Generate ``shape`` samples by reverse diffusion.

    Args:
        denoise_fn: ``f(x_t, t, **condition) -> model output`` (see the module docstring); called
            under ``torch.no_grad()``.
        scheduler: a MONAI DDPMScheduler or DDIMScheduler (:func:`~lungsynth.diffusion.schedules.make_scheduler`).
        shape: [B, C, *S] of the sample (without concatenated condition channels).
        num_inference_steps: number of steps (default: all T). DDPM with fewer steps uses respaced betas.
        generator: torch.Generator for the start noise and the step noise (reproducible samples), or
            one per sample (:func:`per_sample_generators`: a sample then does not depend on its batch).
        device: where the loop runs (default: the generator's device, else CPU).
        x_T: start sample [B, C, *S] instead of fresh noise.
        condition: kwargs for ``denoise_fn``; key ``"concat"`` is concatenated to x_t on channels.
        uncond_condition: the null condition for classifier-free guidance.
        guidance_scale: CFG scale s; 1 gives exactly the conditional prediction (no second call).
        cfg_batch: run the conditional and unconditional passes as one batch of 2B (faster on a GPU).
        eta: DDIM stochasticity (0 = deterministic DDIM); ignored by DDPM.
        step_callback: callable or list of callables ``cb(x_prev, t, t_prev, pred_x0) -> x_prev | None``.
        intermediates_every: keep ``x_t`` and ``pred_x0`` (CPU copies) every k steps and at the end.
        amp: run ``denoise_fn`` under :func:`lungsynth.runtime.autocast` (bf16 where
            :func:`~lungsynth.runtime.choose_precision` picks it; the update itself stays fp32); a string
            (``auto | bf16 | fp32``) is the precision to ask for, as a method's config names it.
        progress: show a tqdm progress bar. desc: its label.
        stats: a dict to fill with ``nfe`` (network calls), ``steps`` and ``seconds``.

    Returns:
        x_0 [B, C, *S] float32; with ``intermediates_every``, ``(x_0, intermediates)`` where each
        intermediate is ``{"step", "timestep", "sample", "pred_x0"}``.
    """
    from tqdm.auto import tqdm

    from lungsynth.runtime import autocast

    shape = tuple(int(s) for s in shape)
    if len(shape) < 3:
        raise ValueError(f"shape must be [B, C, *spatial], got {shape}")
    if device is None:
        first = generator[0] if isinstance(generator, (list, tuple)) else generator
        device = x_T.device if x_T is not None else (first.device if first is not None else "cpu")
    device = torch.device(device)
    if guidance_scale != 1.0 and uncond_condition is None:
        raise ValueError("guidance_scale != 1 needs uncond_condition (the null condition)")
    pairs = timestep_pairs(scheduler, num_inference_steps)
    callbacks = _as_callbacks(step_callback)
    if x_T is not None:
        if tuple(x_T.shape) != shape:
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {shape}")
        x = x_T.to(device=device, dtype=torch.float32)
    else:
        x = randn(shape, generator, device)
    for cb in callbacks:
        on_start = getattr(cb, "on_start", None)
        if on_start is not None:
            x = on_start(x, pairs[0][0])
    use_cfg = guidance_scale != 1.0
    intermediates: list[dict[str, Any]] = []
    nfe = 0
    t0 = time.perf_counter()
    amp_ctx = (lambda: autocast(device, precision=amp if isinstance(amp, str) else None)) if amp else \
        contextlib.nullcontext
    B = shape[0]
    for i, (t, t_prev) in enumerate(tqdm(pairs, desc=desc, disable=not progress, leave=False)):
        tt = torch.full((B,), t, dtype=torch.long, device=device)
        with torch.no_grad(), amp_ctx():
            if use_cfg and cfg_batch:
                both = _call(denoise_fn, torch.cat([x, x]), torch.cat([tt, tt]),
                             _cat_conditions(condition or {}, uncond_condition or {}))
                cond_out, uncond_out = both.float().chunk(2)
                nfe += 2
            else:
                cond_out = _call(denoise_fn, x, tt, condition).float()
                nfe += 1
                uncond_out = None
                if use_cfg:
                    uncond_out = _call(denoise_fn, x, tt, uncond_condition).float()
                    nfe += 1
        if cond_out.shape != x.shape:
            raise ValueError(f"denoise_fn returned {tuple(cond_out.shape)} for a sample of shape {tuple(x.shape)}; "
                             f"it must return one value per sample channel")
        out = cfg_combine(cond_out, uncond_out, guidance_scale) if use_cfg else cond_out
        x, x0 = step(scheduler, out, t, t_prev, x, generator=generator, eta=eta)
        for cb in callbacks:
            res = cb(x, t, t_prev, x0)
            if res is not None:
                x = res
        last = i == len(pairs) - 1
        if intermediates_every and ((i + 1) % int(intermediates_every) == 0 or last):
            intermediates.append({"step": i + 1, "timestep": t_prev, "sample": x.detach().cpu().clone(),
                                  "pred_x0": x0.detach().cpu().clone()})
    if stats is not None:
        stats.update(nfe=nfe, steps=len(pairs), seconds=time.perf_counter() - t0)
    if intermediates_every:
        return x, intermediates
    return x


# --------------------------------------------------------------------------- region hooks


def forward_diffuse(scheduler, x0: torch.Tensor, timestep: int, generator: torch.Generator | None = None,
                    noise: torch.Tensor | None = None) -> torch.Tensor:
    """``q(x_t | x0)`` at an integer timestep with fresh (or given) noise; ``timestep < 0`` returns x0."""
    if timestep < 0:
        return x0
    if noise is None:
        noise = randn(x0.shape, generator, x0.device, x0.dtype)
    t = torch.full((x0.shape[0],), int(timestep), dtype=torch.long, device=x0.device)
    return add_noise(scheduler, x0, noise, t)


class BackgroundAnchor:
    """Re-anchor the region outside a mask to a known image at every step (HR-LDM inpainting).

    After each step: ``x_{t-1} = M * x_{t-1} + (1 - M) * q(x_bg, t-1)`` where M = 1 marks the region the
    model generates (the lesion; for AAS the lung) and ``q(x_bg, t-1)`` is the background diffused to
    the new noise level (or the clean background with ``noise_background=False``, matching a model
    trained with lesion-only noise). At the last step (t-1 = -1) the background is the input exactly.

    Args:
        background: x_bg [B or 1, C, *S] (latents for an LDM, the reference volume for pixel space).
        mask: [B or 1, 1 or C, *S]; bool or float in [0, 1] (soft masks blend).
        scheduler: the sampling scheduler (for ``alphas_cumprod``).
        generator: noise for the background (separate from the sampler's generator).
        start_timestep: anchor only for steps whose ``t <= start_timestep`` (default: every step).
        noise_background: diffuse the background to t-1 (True) or paste it clean (False).
        fixed_noise: draw the background noise once and reuse it at every step.
    """

    def __init__(self, background: torch.Tensor, mask: torch.Tensor, scheduler,
                 generator: torch.Generator | None = None, start_timestep: int | None = None,
                 noise_background: bool = True, fixed_noise: bool = False) -> None:
        if background.ndim < 3 or mask.ndim != background.ndim:
            raise ValueError(f"background {tuple(background.shape)} and mask {tuple(mask.shape)} must both be "
                             f"[B, C, *spatial] with the same number of dimensions")
        if mask.shape[2:] != background.shape[2:]:
            raise ValueError(f"mask spatial size {tuple(mask.shape[2:])} differs from the background's "
                             f"{tuple(background.shape[2:])}")
        self.background = background.float()
        self.mask = mask
        self.scheduler = scheduler
        self.generator = generator
        self.start_timestep = start_timestep
        self.noise_background = noise_background
        self._noise: torch.Tensor | None = None
        self.fixed_noise = fixed_noise

    def _active(self, timestep: int) -> bool:
        return self.start_timestep is None or timestep <= self.start_timestep

    def _target(self, like: torch.Tensor, timestep: int) -> torch.Tensor:
        bg = self.background.to(like.device)
        if bg.shape[0] == 1 and like.shape[0] > 1:
            bg = bg.expand(like.shape[0], *bg.shape[1:])
        if bg.shape != like.shape:
            raise ValueError(f"background {tuple(bg.shape)} does not fit the sample {tuple(like.shape)}")
        if not self.noise_background or timestep < 0:
            return bg
        noise = None
        if self.fixed_noise:
            if self._noise is None or self._noise.shape != bg.shape:
                self._noise = randn(bg.shape, self.generator, bg.device)
            noise = self._noise
        return forward_diffuse(self.scheduler, bg, timestep, self.generator, noise)

    def blend(self, x: torch.Tensor, timestep: int) -> torch.Tensor:
        """``M x + (1 - M) q(x_bg, timestep)``; exact (no arithmetic) outside a bool/binary mask."""
        m = self.mask.to(x.device)
        if m.shape[0] == 1 and x.shape[0] > 1:
            m = m.expand(x.shape[0], *m.shape[1:])
        if m.shape[0] != x.shape[0] or m.shape[1] not in (1, x.shape[1]) or m.shape[2:] != x.shape[2:]:
            raise ValueError(f"mask {tuple(self.mask.shape)} does not fit the sample {tuple(x.shape)}")
        bg = self._target(x, timestep)
        if m.dtype == torch.bool:
            return torch.where(m, x, bg)
        m = m.float()
        binary = bool(((m == 0) | (m == 1)).all())
        if binary:
            return torch.where(m > 0.5, x, bg)
        return m * x + (1.0 - m) * bg

    def on_start(self, x_T: torch.Tensor, first_timestep: int) -> torch.Tensor:
        """Anchor the start noise to ``q(x_bg, T_first)`` outside the mask."""
        if not self._active(first_timestep):
            return x_T
        return self.blend(x_T, first_timestep)

    def __call__(self, x_prev: torch.Tensor, timestep: int, prev_timestep: int,
                 pred_x0: torch.Tensor | None = None) -> torch.Tensor:
        if not self._active(timestep):
            return x_prev
        return self.blend(x_prev, prev_timestep)


def anatomically_aware(reference: torch.Tensor, lung_mask: torch.Tensor, scheduler,
                       blend_from: int | None = None, generator: torch.Generator | None = None,
                       fixed_noise: bool = False) -> BackgroundAnchor:
    """Lung-DDPM's anatomically aware sampling (AAS) as a step callback.

    Outside the lungs ``x_{t-1}`` is the reference CT forward-diffused to t-1; inside the lungs the
    model's step is kept. At the end the volume equals the reference outside the lung exactly.

    Args:
        reference: the reference CT [B or 1, C, *S] in the model's intensity scale.
        lung_mask: [B or 1, 1, *S], 1 inside the lungs (where the model generates).
        blend_from: apply at steps with ``t <= blend_from`` (``cfg.lung_ddpm.blend_from``; None = all).
    """
    return BackgroundAnchor(reference, lung_mask, scheduler, generator=generator, start_timestep=blend_from,
                            noise_background=True, fixed_noise=fixed_noise)
