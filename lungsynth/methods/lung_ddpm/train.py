"""Lung-DDPM's training: the data's training view, the engine task (paper Alg. 1), ``train`` / ``ensure_trained``
and the run directories."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from lungsynth import run_settings
from lungsynth.data import fingerprint
from lungsynth.data.datasets import training_stamp
from lungsynth.engine import TrainTask
from lungsynth.methods.lung_ddpm.model import (KIND, build_scheduler, build_unet, check_layout, check_variant,
                                               layout_channels, make_layout, model_config, nodule_weights,
                                               precision, to_model_scale)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lungsynth.config import Config

RUN_NAMES: dict[str, str] = {"layout": "06_lung_ddpm_layout", "no_lung_layout": "06_lung_ddpm_no_lung_layout"}


class LungDdpmTask(TrainTask):
    """The engine's view of Lung-DDPM: one U-Net, L1 on epsilon (paper Alg. 1; ``lung_ddpm.prediction`` and
    ``lung_ddpm.loss`` choose the target and the norm).

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

    def layout(self, batch: Mapping[str, Any]) -> "torch.Tensor":
        """The batch's layout [B, 1, *S] in {0, 1, 2} (checked)."""
        return check_layout(batch["layout"] if "layout" in batch else make_layout(batch["lung"], batch["label"]))

    def condition(self, batch: Mapping[str, Any], layout: "torch.Tensor | None" = None) -> "torch.Tensor":
        """Layout channels [B, K, *S] of a batch (of ``layout`` when the caller already has it)."""
        layout = self.layout(batch) if layout is None else layout
        return layout_channels(layout, self.lung_layout, self.cfg.lung_ddpm.layout_encoding)

    def training_step(self, batch: Any, step: int) -> dict[str, Any]:
        import torch

        from lungsynth.diffusion.objectives import diffusion_loss, target_for
        from lungsynth.diffusion.schedules import add_noise, sample_timesteps

        x0 = to_model_scale(batch["ct"].float())
        layout = self.layout(batch)
        cond = self.condition(batch, layout).to(x0)
        noise = torch.randn_like(x0)
        t = sample_timesteps(x0.shape[0], self.scheduler.num_train_timesteps, device=x0.device)
        x_t = add_noise(self.scheduler, x0, noise, t)  # eq. (2)
        out = self.unet(torch.cat([x_t, cond], dim=1), t)
        # eq. (7): L1 on epsilon (lung_ddpm.prediction / .loss: v, L2; .nodule_weight: nodule voxels weigh more)
        return {"loss": diffusion_loss(out, target_for(self.scheduler, x0, noise, t), mask=nodule_weights(
            layout, self.cfg.lung_ddpm.nodule_weight), kind=self.cfg.lung_ddpm.loss, check_finite=False)}

    def config(self) -> dict[str, Any]:
        return model_config(self.cfg, self.variant)


def default_run_dir(cfg: "Config", variant: str = "layout", create: bool = True) -> Path:
    """``runs/<profile>/`` + :data:`RUN_NAMES` of ``variant``, with ``@<overrides>`` when ``cfg`` overrides a
    training setting (:func:`lungsynth.run_settings.run_name`)."""
    from lungsynth.paths import run_dir

    return run_dir(cfg.profile, run_settings.run_name(cfg, RUN_NAMES[check_variant(variant)], "lung_ddpm"),
                   create=create)


def make_trainer(cfg: "Config", run_dir: Path | str | None, **kwargs: Any):
    """The engine's Trainer with Lung-DDPM's budget and EMA (decay, start, interval) from ``cfg.lung_ddpm``."""
    from lungsynth.engine import Trainer

    c = cfg.lung_ddpm
    settings = dict(max_steps=c.train_steps, lr=c.lr, schedule=c.lr_schedule, batch_size=c.batch_size,
                    grad_accum=c.grad_accum, grad_clip=c.grad_clip or None, ema_decay=c.ema_decay,
                    ema_start=c.ema_start, ema_every=c.ema_every, seed=cfg.seed)
    settings["precision"] = precision(cfg)
    settings.update(kwargs)
    return Trainer.from_config(cfg.engine, run_dir, **settings)


def training_dataset(cfg: "Config", split: str = "train"):
    """The prepared volumes at ``cfg.data.size_ddpm`` (prepares the data first when missing), or cubes of
    ``cfg.lung_ddpm.train_patch`` cut from them (:class:`lungsynth.data.patches.LungCubes`)."""
    from lungsynth.data.datasets import VolumeDataset, ensure_prepared
    from lungsynth.data.patches import LungCubes

    ensure_prepared(cfg)
    keys = ("ct", "lung", "label")
    volumes = VolumeDataset(cfg, split, size=cfg.data.size_ddpm, keys=keys)
    side = int(cfg.lung_ddpm.train_patch)
    return LungCubes(volumes, keys, side) if 0 < side < int(cfg.data.size_ddpm) else volumes


def rebuild_command(cfg: "Config", variant: str) -> str:
    flag = "" if check_variant(variant) == "layout" else " --no-lung-layout"
    return f"lungsynth lung-ddpm train --profile {cfg.profile}{flag} --fresh"


def train(cfg: "Config", variant: str = "layout", run_dir: Path | str | None = None, *, dataset: Any = None,
          fresh: bool = False, progress: bool | None = None) -> Path:
    """Train (or resume) one variant; returns the run directory (``final.pt``, ``metrics.csv``, ``run.json``).

    Args:
        variant: ``"layout"`` (Lung-DDPM) or ``"no_lung_layout"`` (ablation).
        dataset: map-style dataset of batches as :class:`LungDdpmTask` reads (default: the prepared
            training split at ``cfg.data.size_ddpm``).
    """
    from lungsynth.runtime import RunRecord, seed_everything

    run = Path(run_dir) if run_dir is not None else default_run_dir(cfg, variant)
    run.mkdir(parents=True, exist_ok=True)
    data = dataset if dataset is not None else training_dataset(cfg)
    stamp = training_stamp(cfg) if dataset is None else None
    fresh = fingerprint.claim_run(run, stamp, rebuild_command(cfg, variant), fresh=fresh)
    if len(data) == 0:
        raise ValueError(f"no training volumes for Lung-DDPM in profile {cfg.profile!r}; run `lungsynth data "
                         f"prepare --profile {cfg.profile}`")
    seed_everything(cfg.seed)  # the initial weights (the engine seeds the rest): one config, one training
    task = LungDdpmTask(cfg, variant)
    with RunRecord(run, config=cfg, seed=cfg.seed, command=f"lung-ddpm train {variant}") as record:
        with record.timer("train"):
            result = make_trainer(cfg, run, fresh=fresh, progress=progress).fit(task, data)
        record["steps"] = result.steps
        record["stopped_by"] = result.stopped_by
        record["last_losses"] = result.last_losses
        record["variant"] = variant
    run_settings.record(run, run_settings.training_settings(cfg, "lung_ddpm"))
    return run


def is_trained(run_dir: Path | str) -> bool:
    from lungsynth.engine import FINAL_NAME

    return (Path(run_dir) / FINAL_NAME).is_file()


def ensure_trained(cfg: "Config", variant: str = "layout", run_dir: Path | str | None = None,
                   progress: bool | None = None, dataset: Any = None) -> Path:
    """The run dir of ``variant``, training (or resuming a killed run) when it has no ``final.pt`` or was
    trained on other prepared data than ``cfg``'s (``dataset``: train on these items instead, as :func:`train`)."""
    run = Path(run_dir) if run_dir is not None else default_run_dir(cfg, variant)
    stamp = training_stamp(cfg) if dataset is None else None
    if is_trained(run) and fingerprint.check_run(run, stamp, rebuild_command(cfg, variant)):
        stale = config_mismatch(run, cfg, variant)
        if stale is None:
            run_settings.check_recorded(run, run_settings.training_settings(cfg, "lung_ddpm"),
                                        rebuild_command(cfg, variant))
            return run
        import warnings

        warnings.warn(f"{stale}: training it again from scratch", stacklevel=2)
        return train(cfg, variant, run, dataset=dataset, progress=progress, fresh=True)
    return train(cfg, variant, run, dataset=dataset, progress=progress)


def config_mismatch(run_dir: Path | str, cfg: "Config", variant: str = "layout") -> str | None:
    """Why the final checkpoint of ``run_dir`` does not fit ``cfg`` (other widths, target or loss: a course
    profile changed since it was trained), or None when it fits."""
    from lungsynth.engine import FINAL_NAME, check_compatible, load_checkpoint

    path = Path(run_dir) / FINAL_NAME
    try:
        check_compatible(load_checkpoint(path), path, KIND, model_config(cfg, variant))
    except ValueError as err:
        return str(err)
    return None
