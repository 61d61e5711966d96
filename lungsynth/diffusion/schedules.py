"""Noise schedules and the MONAI schedulers built from them.

Every method builds its scheduler here, so the course uses one set of names:

==================  ==============================  ==========================================
``schedule``        MONAI ``NoiseSchedules`` entry   used by
==================  ==============================  ==========================================
``linear``          ``linear_beta``                 LAND, bbox-LDM (betas 1e-4 .. 2e-2 default)
``scaled_linear``   ``scaled_linear_beta``          HR-LDM (betas 0.0015 .. 0.0195), text2img
``cosine``          ``cosine``                      Lung-DDPM (250 steps; Nichol & Dhariwal 2021)
``sigmoid``         ``sigmoid_beta``                (for experiments)
==================  ==============================  ==========================================

Convention (MONAI's, inherited from diffusers): timestep index ``t`` in ``0 .. T-1`` carries
``betas[t]`` and ``alphas_cumprod[t] = prod_{s<=t} (1 - betas[s])``, so index 0 is already one
noising step away from the data. For the cosine schedule MONAI evaluates
``f(x) = cos(((x/T + s)/(1 + s)) * pi/2)^2`` on ``x = 0..T``, takes
``beta = 1 - f(x+1)/f(x)`` clipped to 0.999 and re-accumulates, i.e.
``alphas_cumprod[t] = f(t+1)/f(0)`` wherever no clipping happened (improved DDPM, eq. 17).

Note: MONAI's ``Scheduler.add_noise`` casts (and stores) ``alphas_cumprod`` to the dtype of its
input; under bf16 autocast that silently degrades the schedule. :func:`add_noise` here computes
in float32 and never mutates the scheduler.
"""

from __future__ import annotations

from typing import Any

import torch

#: course name -> MONAI NoiseSchedules name
SCHEDULES: dict[str, str] = {
    "linear": "linear_beta",
    "scaled_linear": "scaled_linear_beta",
    "cosine": "cosine",
    "sigmoid": "sigmoid_beta",
}
#: default (beta_start, beta_end) per beta schedule; cosine has none
DEFAULT_BETAS: dict[str, tuple[float, float]] = {
    "linear": (1e-4, 2e-2),
    "scaled_linear": (0.0015, 0.0195),
    "sigmoid": (1e-4, 2e-2),
}
#: accepted spellings of the prediction type -> MONAI's name
PREDICTION_TYPES: dict[str, str] = {
    "epsilon": "epsilon", "eps": "epsilon", "noise": "epsilon",
    "v_prediction": "v_prediction", "v": "v_prediction", "velocity": "v_prediction",
    "sample": "sample", "x0": "sample", "x_0": "sample",
}
SCHEDULER_KINDS: tuple[str, ...] = ("ddpm", "ddim")


def canonical_schedule(schedule: str) -> str:
    """``"linear"`` / ``"linear_beta"`` -> ``"linear"``; unknown names are a ValueError."""
    if schedule in SCHEDULES:
        return schedule
    for short, monai_name in SCHEDULES.items():
        if schedule == monai_name:
            return short
    raise ValueError(f"unknown noise schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")


def canonical_prediction_type(prediction_type: str) -> str:
    """``"v"`` / ``"v_prediction"`` -> ``"v_prediction"``, ``"eps"`` -> ``"epsilon"``, ``"x0"`` -> ``"sample"``."""
    try:
        return PREDICTION_TYPES[prediction_type]
    except KeyError:
        raise ValueError(f"unknown prediction type {prediction_type!r}; use epsilon, v_prediction or sample "
                         f"(aliases: {', '.join(sorted(PREDICTION_TYPES))})") from None


def make_scheduler(kind: str = "ddpm", num_train_timesteps: int = 1000, schedule: str = "linear",
                   prediction_type: str = "epsilon", *, clip_sample: bool = False,
                   clip_sample_range: tuple[float, float] = (-1.0, 1.0), **betas: Any):
    """A MONAI ``DDPMScheduler`` or ``DDIMScheduler`` with a course-named schedule.

    Args:
        kind: ``"ddpm"`` or ``"ddim"``. Training only needs the schedule, so either works there;
            sampling picks the update rule (see :func:`lungsynth.diffusion.samplers.sample`).
        num_train_timesteps: T, the number of training timesteps (1000; Lung-DDPM 250).
        schedule: ``linear`` | ``scaled_linear`` | ``cosine`` | ``sigmoid`` (or MONAI's names).
        prediction_type: ``epsilon`` | ``v_prediction`` | ``sample`` (aliases ``eps``, ``v``, ``x0``).
        clip_sample: clip the predicted x0 to ``clip_sample_range`` at each sampling step. Off by
            default: latents are unbounded; turn it on for pixel-space models trained in [-1, 1].
        **betas: schedule arguments: ``beta_start``/``beta_end`` (linear, scaled_linear, sigmoid;
            defaults in :data:`DEFAULT_BETAS`), ``s`` (cosine, default 0.008), ``sig_range``
            (sigmoid), and for DDIM ``set_alpha_to_one`` / ``steps_offset``.

    Returns:
        the scheduler (a ``torch.nn.Module``); ``scheduler.alphas_cumprod`` is a float32 tensor [T].
    """
    from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

    if kind not in SCHEDULER_KINDS:
        raise ValueError(f"unknown scheduler kind {kind!r}; use 'ddpm' or 'ddim'")
    if int(num_train_timesteps) < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
    name = canonical_schedule(schedule)
    pred = canonical_prediction_type(prediction_type)
    kwargs: dict[str, Any] = dict(betas)
    ddim_only = {k: kwargs.pop(k) for k in ("set_alpha_to_one", "steps_offset") if k in kwargs}
    if ddim_only and kind != "ddim":
        raise ValueError(f"{', '.join(ddim_only)} only apply to the DDIM scheduler")
    if name == "cosine":
        bad = {"beta_start", "beta_end"} & set(kwargs)
        if bad:
            raise ValueError(f"the cosine schedule has no {', '.join(sorted(bad))}; only 's' (default 0.008)")
    else:
        start, end = DEFAULT_BETAS[name]
        kwargs.setdefault("beta_start", start)
        kwargs.setdefault("beta_end", end)
        if kwargs["beta_start"] is None:
            kwargs["beta_start"] = start
        if kwargs["beta_end"] is None:
            kwargs["beta_end"] = end
        if not 0.0 < float(kwargs["beta_start"]) < float(kwargs["beta_end"]) < 1.0:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {kwargs['beta_start']}, {kwargs['beta_end']}")
    common = dict(num_train_timesteps=int(num_train_timesteps), schedule=SCHEDULES[name], clip_sample=clip_sample,
                  prediction_type=pred, clip_sample_min=float(clip_sample_range[0]),
                  clip_sample_max=float(clip_sample_range[1]))
    if kind == "ddpm":
        sched = DDPMScheduler(**common, **kwargs)
    else:
        sched = DDIMScheduler(**common, **ddim_only, **kwargs)
    sched.schedule_name = name  # plain attribute: lets samplers/figures say which schedule this is
    return sched


def betas_for(schedule: str, num_train_timesteps: int, **betas: Any) -> torch.Tensor:
    """The beta sequence [T] (float64) of a named schedule, without building a scheduler."""
    return make_scheduler("ddpm", num_train_timesteps, schedule, **betas).betas.double()


def alphas_cumprod(scheduler) -> torch.Tensor:
    """``alpha_bar[t]`` for t = 0..T-1 as a float64 CPU tensor [T] (a copy; the scheduler is untouched)."""
    return scheduler.alphas_cumprod.detach().to("cpu", torch.float64).clone()


def _gather(table: torch.Tensor, timesteps: torch.Tensor | int, like: torch.Tensor | None = None) -> torch.Tensor:
    t = torch.as_tensor(timesteps, dtype=torch.long)
    device = like.device if like is not None else t.device
    return table.to(device)[t.to(device)]


def alpha_bar_at(scheduler, timesteps: torch.Tensor | int, like: torch.Tensor | None = None) -> torch.Tensor:
    """``alpha_bar`` at ``timesteps`` (int or LongTensor [B]); float32, on ``like``'s device when given.

    A negative timestep means "before the first step" and gives 1.0 (the clean data).
    """
    t = torch.as_tensor(timesteps, dtype=torch.long)
    table = scheduler.alphas_cumprod.detach().float()
    out = _gather(table, t.clamp(min=0), like)
    return torch.where(t.to(out.device) < 0, torch.ones_like(out), out)


def snr(scheduler, timesteps: torch.Tensor | int) -> torch.Tensor:
    """Signal-to-noise ratio ``SNR(t) = alpha_bar_t / (1 - alpha_bar_t)``, float32, shape of ``timesteps``."""
    ab = alpha_bar_at(scheduler, timesteps).double()
    return (ab / (1.0 - ab)).float()


def snr_table(scheduler) -> torch.Tensor:
    """SNR for every timestep, float64 [T] (for figures: log-SNR against t)."""
    ab = alphas_cumprod(scheduler)
    return ab / (1.0 - ab)


def broadcast_to(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] values -> [B, 1, 1, ...] with ``like.ndim`` dims, on ``like``'s device and dtype."""
    v = values.to(device=like.device, dtype=like.dtype)
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def add_noise(scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Forward diffusion ``q(x_t | x_0)``: ``sqrt(ab_t) x0 + sqrt(1 - ab_t) noise``.

    Args:
        x0, noise: [B, C, *spatial]; timesteps: LongTensor [B] (negative entries return x0 unchanged).
    Returns:
        x_t [B, C, *spatial] in x0's dtype (computed in float32; the scheduler is not modified).
    """
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
    t = torch.as_tensor(timesteps, dtype=torch.long, device=x0.device).reshape(-1)
    if t.numel() == 1 and x0.shape[0] != 1:
        t = t.expand(x0.shape[0])
    ab = alpha_bar_at(scheduler, t, like=x0)
    a = broadcast_to(ab.sqrt(), x0.float())
    s = broadcast_to((1.0 - ab).sqrt(), x0.float())
    out = a * x0.float() + s * noise.float()
    keep = broadcast_to((t < 0).float(), x0.float()) > 0
    return torch.where(keep, x0.float(), out).to(x0.dtype)


def sample_timesteps(batch_size: int, num_train_timesteps: int, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Uniform training timesteps: LongTensor [batch_size] in ``0 .. T-1`` on ``device``."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    t = torch.randint(0, int(num_train_timesteps), (int(batch_size),), generator=generator, device=gen_device)
    return t.to(device) if device is not None else t


def describe(scheduler) -> dict[str, Any]:
    """A JSON-able summary (kind, T, schedule, prediction type, first/last beta) for run records."""
    b = scheduler.betas.detach().double()
    return {
        "kind": "ddim" if type(scheduler).__name__ == "DDIMScheduler" else "ddpm",
        "num_train_timesteps": int(scheduler.num_train_timesteps),
        "schedule": getattr(scheduler, "schedule_name", "unknown"),
        "prediction_type": str(scheduler.prediction_type),
        "beta_first": float(b[0]), "beta_last": float(b[-1]),
        "alpha_bar_last": float(alphas_cumprod(scheduler)[-1]),
        "clip_sample": bool(getattr(scheduler, "clip_sample", False)),
    }
