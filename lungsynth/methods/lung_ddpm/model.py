"""Lung-DDPM's network, schedule, training task (through the engine) and sampler with AAS."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from lungsynth.methods.lung_ddpm.layout import (check_layout, check_reference, generation_mask, layout_channels,
                                                make_layout, n_layout_channels, to_model_scale, to_unit_scale)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lungsynth.config import Config

KIND = "lung_ddpm"
VARIANTS: tuple[str, ...] = ("layout", "no_lung_layout")
RUN_NAMES: dict[str, str] = {"layout": "06_lung_ddpm_layout", "no_lung_layout": "06_lung_ddpm_no_lung_layout"}


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown Lung-DDPM variant {variant!r}; use one of {', '.join(VARIANTS)}")
    return variant
# --------------------------------------------------------------------------- networks


def build_unet(cfg: "Config", lung_layout: bool = True) -> "nn.Module":
    """The denoiser: ``net(cat[x_t, layout channels] [B, 1+K, *S], t [B]) -> eps [B, 1, *S]``."""
    from lungsynth.nn.unets import diffusion_unet

    c = cfg.lung_ddpm
    levels = len(c.unet_channels)
    bad = [a for a in c.attention_at if not 0 <= int(a) < levels]
    if bad:
        raise ValueError(f"lung_ddpm.attention_at {tuple(c.attention_at)} names levels outside 0..{levels - 1}")
    return diffusion_unet(3, 1 + n_layout_channels(lung_layout, c.layout_encoding), 1, channels=c.unet_channels,
                          num_res_blocks=c.num_res_blocks,
                          attention_levels=tuple(i in set(int(a) for a in c.attention_at) for i in range(levels)))


def build_scheduler(cfg: "Config", kind: str = "ddpm"):
    """MONAI DDPM scheduler: cosine schedule (Nichol & Dhariwal 2021), T = 250, epsilon, x0 clipped to [-1, 1]."""
    from lungsynth.diffusion.schedules import make_scheduler

    return make_scheduler(kind, cfg.lung_ddpm.num_train_timesteps, cfg.lung_ddpm.schedule, "epsilon",
                          clip_sample=True)


def model_config(cfg: "Config", variant: str) -> dict[str, Any]:
    """What builds the weights (stored in checkpoints; a mismatch on load is an error)."""
    c = cfg.lung_ddpm
    return {"unet_channels": list(c.unet_channels), "attention_at": list(c.attention_at),
            "num_res_blocks": int(c.num_res_blocks), "layout_encoding": c.layout_encoding,
            "lung_layout": check_variant(variant) == "layout", "num_train_timesteps": int(c.num_train_timesteps),
            "schedule": c.schedule, "size": int(cfg.data.size_ddpm)}


# --------------------------------------------------------------------------- training


def _make_task_class() -> type:
    """Build :class:`LungDdpmTask` on first use, so importing this module (``lungsynth --help``) stays free of torch."""
    from lungsynth.engine import TrainTask

    class LungDdpmTask(TrainTask):
        """The engine's view of Lung-DDPM: one U-Net, L1 on epsilon (paper Alg. 1).

        Batches are dicts with ``"ct"`` [B, 1, *S] in [0, 1] and either ``"layout"`` [B, 1, *S] or
        ``"lung"`` and ``"label"`` [B, 1, *S] (as :class:`lungsynth.data.datasets.VolumeDataset` yields).
        """

        kind = KIND

        def __init__(self, cfg: "Config", variant: str = "layout") -> None:
            self.cfg = cfg
            self.variant = check_variant(variant)
            self.lung_layout = variant == "layout"
            self.unet = build_unet(cfg, self.lung_layout)
            self.scheduler = build_scheduler(cfg)

        def modules(self) -> dict[str, "nn.Module"]:
            return {"unet": self.unet}

        def condition(self, batch: Mapping[str, Any]) -> "torch.Tensor":
            """Layout channels [B, K, *S] of a batch."""
            layout = batch["layout"] if "layout" in batch else make_layout(batch["lung"], batch["label"])
            return layout_channels(check_layout(layout), self.lung_layout, self.cfg.lung_ddpm.layout_encoding)

        def training_step(self, batch: Any, step: int) -> dict[str, Any]:
            import torch

            from lungsynth.diffusion.objectives import diffusion_loss
            from lungsynth.diffusion.schedules import add_noise, sample_timesteps

            x0 = to_model_scale(batch["ct"].float())
            cond = self.condition(batch).to(x0)
            noise = torch.randn_like(x0)
            t = sample_timesteps(x0.shape[0], self.scheduler.num_train_timesteps, device=x0.device)
            x_t = add_noise(self.scheduler, x0, noise, t)
            eps = self.unet(torch.cat([x_t, cond], dim=1), t)
            return {"loss": diffusion_loss(eps, noise, kind="l1", check_finite=False)}

        def config(self) -> dict[str, Any]:
            return model_config(self.cfg, self.variant)

    LungDdpmTask.__module__ = __name__
    LungDdpmTask.__qualname__ = "LungDdpmTask"
    return LungDdpmTask


def _task_class() -> type:
    cls = globals().get("LungDdpmTask")
    if cls is None:
        cls = globals()["LungDdpmTask"] = _make_task_class()
    return cls


def __getattr__(name: str) -> Any:
    # ``from lungsynth.methods.lung_ddpm import LungDdpmTask`` builds the class lazily (PEP 562).
    if name == "LungDdpmTask":
        return _task_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_run_dir(cfg: "Config", variant: str = "layout") -> Path:
    from lungsynth.paths import run_dir

    return run_dir(cfg.profile, RUN_NAMES[check_variant(variant)])


def make_trainer(cfg: "Config", run_dir: Path | str | None, **kwargs: Any):
    """The engine's Trainer with Lung-DDPM's budget and EMA (decay, start, interval) from ``cfg.lung_ddpm``."""
    from lungsynth.engine import Trainer

    c = cfg.lung_ddpm
    settings = dict(max_steps=c.train_steps, lr=c.lr, batch_size=c.batch_size, ema_decay=c.ema_decay,
                    ema_start=c.ema_start, ema_every=c.ema_every, seed=cfg.seed)
    settings.update(kwargs)
    return Trainer.from_config(cfg.engine, run_dir, **settings)


def training_dataset(cfg: "Config", split: str = "train"):
    """The prepared volumes at ``cfg.data.size_ddpm`` (prepares the data first when missing)."""
    from lungsynth.data.datasets import VolumeDataset, ensure_prepared

    ensure_prepared(cfg)
    return VolumeDataset(cfg, split, size=cfg.data.size_ddpm, keys=("ct", "lung", "label"))


def train(cfg: "Config", variant: str = "layout", run_dir: Path | str | None = None, *, dataset: Any = None,
          fresh: bool = False, progress: bool | None = None) -> Path:
    """Train (or resume) one variant; returns the run directory (``final.pt``, ``metrics.csv``, ``run.json``).

    Args:
        variant: ``"layout"`` (Lung-DDPM) or ``"no_lung_layout"`` (ablation).
        dataset: map-style dataset of batches as :class:`LungDdpmTask` reads (default: the prepared
            training split at ``cfg.data.size_ddpm``).
    """
    from lungsynth.runtime import RunRecord

    run = Path(run_dir) if run_dir is not None else default_run_dir(cfg, variant)
    run.mkdir(parents=True, exist_ok=True)
    data = dataset if dataset is not None else training_dataset(cfg)
    if len(data) == 0:
        raise ValueError(f"no training volumes for Lung-DDPM in profile {cfg.profile!r}; run `lungsynth data "
                         f"prepare --profile {cfg.profile}`")
    task = _task_class()(cfg, variant)
    with RunRecord(run, config=cfg, seed=cfg.seed, command=f"lung-ddpm train {variant}") as record:
        with record.timer("train"):
            result = make_trainer(cfg, run, fresh=fresh, progress=progress).fit(task, data)
        record["steps"] = result.steps
        record["stopped_by"] = result.stopped_by
        record["last_losses"] = result.last_losses
        record["variant"] = variant
    return run


def is_trained(run_dir: Path | str) -> bool:
    from lungsynth.engine import FINAL_NAME

    return (Path(run_dir) / FINAL_NAME).is_file()


def ensure_trained(cfg: "Config", variant: str = "layout", run_dir: Path | str | None = None,
                   progress: bool | None = None) -> Path:
    """The run dir of ``variant``, training (or resuming a killed run) when it has no ``final.pt``."""
    run = Path(run_dir) if run_dir is not None else default_run_dir(cfg, variant)
    if is_trained(run):
        return run
    return train(cfg, variant, run, progress=progress)


# --------------------------------------------------------------------------- sampling


@dataclasses.dataclass
class LungDDPM:
    """A trained Lung-DDPM: the (EMA) U-Net, its scheduler and how it reads layouts."""

    unet: "nn.Module"
    scheduler: Any
    cfg: "Config"
    variant: str = "layout"
    run_dir: Path | None = None

    @property
    def lung_layout(self) -> bool:
        return self.variant == "layout"

    def denoise_fn(self, x: "torch.Tensor", t: "torch.Tensor") -> "torch.Tensor":
        return self.unet(x, t)

    def sample(self, layout: "torch.Tensor", reference: "torch.Tensor | None" = None, *, aas: bool = True,
               generator: "torch.Generator | None" = None, num_inference_steps: int | None = None,
               blend_from: int | None = None, device: Any = None, progress: bool = False,
               intermediates_every: int | None = None, stats: dict | None = None) -> Any:
        """Generate CT volumes for a layout (paper Alg. 2 with AAS, or plain DDPM sampling without).

        Args:
            layout: [B, 1, S, S, S] in {0, 1, 2} (:func:`make_layout`); always the full layout: the
                "w/o lung layout" model drops the lung itself, and AAS uses lung + nodule as ``m_l``.
            reference: [B or 1, 1, S, S, S] CT in [0, 1]; required with ``aas=True``.
            aas: anatomically aware sampling (outside the lungs: the reference diffused to t-1).
            generator: seeds the start noise and the step noise; the reference's noise uses a
                generator seeded from it, so a seed gives one sample.
            num_inference_steps: reverse steps (default ``cfg.lung_ddpm.sample_steps``; T = all).
            blend_from: AAS from this timestep down (default ``cfg.lung_ddpm.blend_from``).
            intermediates_every: also return ``x_t`` every k steps (see ``samplers.sample``).
        Returns:
            [B, 1, S, S, S] float32 in [0, 1] on the CPU; with AAS, bit-identical to ``reference``
            outside ``m_l``. With ``intermediates_every``: ``(x, intermediates)`` (model scale).
        """
        import torch

        from lungsynth.diffusion.samplers import anatomically_aware
        from lungsynth.diffusion.samplers import sample as reverse_diffusion
        from lungsynth.runtime import device as default_device

        lay = check_layout(layout)
        ref = check_reference(reference, lay) if reference is not None else None
        if aas and ref is None:
            raise ValueError("anatomically aware sampling needs the reference CT [B or 1, 1, S, S, S] in [0, 1]; "
                             "pass reference=... or aas=False")
        dev = torch.device(device) if device is not None else default_device()
        self.unet.to(dev).eval()
        B = lay.shape[0]
        cond = layout_channels(lay, self.lung_layout, self.cfg.lung_ddpm.layout_encoding).to(dev)
        steps = int(num_inference_steps or self.cfg.lung_ddpm.sample_steps)
        callbacks = []
        gen = generator if generator is not None else torch.Generator().manual_seed(self.cfg.seed)
        if aas:
            assert ref is not None
            ref_gen = torch.Generator(device=gen.device).manual_seed(
                int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device)))
            m_l = generation_mask(lay).to(dev)
            callbacks.append(anatomically_aware(to_model_scale(ref).to(dev), m_l, self.scheduler,
                                                self.cfg.lung_ddpm.blend_from if blend_from is None else blend_from,
                                                generator=ref_gen))
        out = reverse_diffusion(self.denoise_fn, self.scheduler, (B, 1, *lay.shape[2:]), steps, generator=gen,
                                device=dev, condition={"concat": cond}, step_callback=callbacks,
                                intermediates_every=intermediates_every, amp=True, progress=progress,
                                desc="lung-ddpm", stats=stats)
        x, inter = out if intermediates_every else (out, None)
        x = to_unit_scale(x.float()).cpu()
        if aas:
            assert ref is not None
            # The last AAS step pasted the reference in [-1, 1]; mapping back to [0, 1] rounds, so the
            # same paste is repeated in the output scale to give the reference bit for bit.
            x = torch.where(generation_mask(lay), x, ref.expand_as(x))
        return (x, inter) if intermediates_every else x


def load(cfg: "Config", variant: str = "layout", run_dir: Path | str | None = None, *, use_ema: bool = True,
         train_if_missing: bool = True, progress: bool | None = None) -> LungDDPM:
    """A trained model (EMA weights by default) ready to :meth:`LungDDPM.sample`.

    Trains first (:func:`ensure_trained`) when the run has no ``final.pt`` and ``train_if_missing``.
    """
    from lungsynth.engine import LAST_NAME, load_weights

    run = Path(run_dir) if run_dir is not None else default_run_dir(cfg, variant)
    if train_if_missing:
        ensure_trained(cfg, variant, run, progress=progress)
    elif not (is_trained(run) or (run / LAST_NAME).is_file()):
        raise FileNotFoundError(f"no Lung-DDPM checkpoint in {run}; run `lungsynth lung-ddpm train --profile "
                                f"{cfg.profile}{' --no-lung-layout' if variant == 'no_lung_layout' else ''}`")
    unet = build_unet(cfg, variant == "layout")
    load_weights(run, kind=KIND, config=model_config(cfg, variant), modules={"unet": unet}, use_ema=use_ema)
    return LungDDPM(unet.eval(), build_scheduler(cfg), cfg, variant, run)


def sample(model: LungDDPM, layout: "torch.Tensor", reference: "torch.Tensor | None" = None, **kwargs: Any):
    """Function form of :meth:`LungDDPM.sample` (same arguments)."""
    return model.sample(layout, reference, **kwargs)
