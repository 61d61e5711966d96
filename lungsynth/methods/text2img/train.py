"""Chapter 07's training: the ROI view of the data, augmentation, prompt dropout, the engine task.

Stable Diffusion's objective, noise prediction (Urata et al. fine-tune the U-Net with it, §2.3)::

    z_0 = E(x) * scale,   z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps,
    L = || eps - eps_theta(z_t, t, tau(prompt)) ||^2,   prompt -> "" with probability p (CFG dropout)

with the paper's augmentation (90/180/270-degree rotations and horizontal flips, §2.2). Fine-tuning
a local Stable Diffusion U-Net uses AdamW at ``cfg.text2img.pretrained_lr`` (1e-6, §2.3).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lungsynth.config import Config
from lungsynth.data import fingerprint
from lungsynth.data.datasets import training_stamp
from lungsynth.engine import TrainTask, Trainer
from lungsynth.methods.text2img.model import (KIND, Text2ImgModel, build_model, default_run_dir, model_config,
                                              pipeline_summary)
from lungsynth.methods.text2img.sample import load
from lungsynth.runtime import RunRecord


# §2.2: rotation (90, 180, 270 degrees) and horizontal flipping of the training ROIs.
def augment(images: torch.Tensor) -> torch.Tensor:
    """Random 90-degree rotation and horizontal flip per image (the paper's augmentation). [B,1,H,W]."""
    out = []
    for image in images:
        image = torch.rot90(image, int(torch.randint(0, 4, ()).item()), dims=(-2, -1))
        out.append(image.flip(-1) if torch.rand(()) < 0.5 else image)
    return torch.stack(out)


def drop_prompts(prompts: Sequence[str], p: float) -> list[str]:
    """Replace each prompt by the empty (unconditional) prompt with probability ``p``."""
    return ["" if torch.rand(()).item() < p else prompt for prompt in prompts]


class Text2ImgTask(TrainTask):
    """Noise prediction on ROI latents with prompt dropout; only the U-Net trains."""

    kind = KIND

    def __init__(self, model: Text2ImgModel, prompt_dropout: float = 0.1, augment_images: bool = True) -> None:
        self.model, self.prompt_dropout, self.augment_images = model, float(prompt_dropout), augment_images

    def modules(self) -> dict[str, nn.Module]:
        return {"unet": self.model.unet}

    def setup(self, device: torch.device) -> None:
        self.model.text.to(device)
        self.model.codec.to(device)

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        images = augment(batch["image"]) if self.augment_images else batch["image"]
        z0 = self.model.codec.encode(images)
        context = self.model.text(drop_prompts(batch["prompt"], self.prompt_dropout)).to(z0.device)
        noise = torch.randn_like(z0)
        t = torch.randint(0, self.model.scheduler.config.num_train_timesteps, (z0.shape[0],), device=z0.device)
        z_t = self.model.scheduler.add_noise(z0, noise, t)
        pred = self.model.unet(z_t, t, encoder_hidden_states=context).sample
        # L = || eps - eps_theta(z_t, t, tau(y)) ||^2, y -> "" with probability p (Stable Diffusion's objective, §2.3)
        return {"loss": F.mse_loss(pred.float(), noise)}

    def config(self) -> dict[str, Any]:
        return model_config(self.model)


def roi_dataset(cfg: Config, split: str):
    """The chapter 01 ROI view (image [1,R,R] in [0,1], scores, prompt); prepared when missing."""
    from lungsynth.data.datasets import RoiDataset, ensure_prepared

    ensure_prepared(cfg)
    return RoiDataset(cfg, split)


def rebuild_command(cfg: Config, pretrained: str | Path | None) -> str:
    return f"lungsynth text2img train --profile {cfg.profile}{f' --pretrained {pretrained}' if pretrained else ''} --fresh"


def train(cfg: Config, pretrained: str | Path | None = None, run_dir: Path | None = None,
          max_steps: int | None = None, fresh: bool = False, data=None) -> Path:
    """Train (or fine-tune a local SD U-Net, AdamW lr ``cfg.text2img.pretrained_lr``); returns the run dir.

    ``data`` (items with "image" [1,R,R] and "prompt") defaults to the training ROIs of chapter 01.
    """
    run_dir = Path(run_dir or default_run_dir(cfg, pretrained))
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp = training_stamp(cfg) if data is None else None
    fresh = fingerprint.claim_run(run_dir, stamp, rebuild_command(cfg, pretrained)) or fresh
    model = build_model(cfg, pretrained)
    c = cfg.text2img
    trainer = Trainer.from_config(cfg.engine, run_dir, max_steps=max_steps or c.train_steps,
                                  lr=c.pretrained_lr if pretrained else c.lr, batch_size=c.batch_size,
                                  seed=cfg.seed, fresh=fresh, warmup_steps=min(50, (max_steps or c.train_steps) // 10))
    data = data if data is not None else roi_dataset(cfg, "train")
    with RunRecord(run_dir, config=cfg.to_dict(), seed=cfg.seed) as record:
        if pretrained:
            record["pipeline"] = pipeline_summary(pretrained)
        result = trainer.fit(Text2ImgTask(model, c.prompt_dropout), data)
        record["train"] = {"steps": result.steps, "last_losses": result.last_losses, "seconds": result.seconds}
    return run_dir


def is_trained(run_dir: Path, steps: int) -> bool:
    """Whether ``run_dir`` holds a final checkpoint of at least ``steps`` optimiser steps."""
    from lungsynth.engine import load_checkpoint

    final = Path(run_dir) / "final.pt"
    return final.is_file() and int(load_checkpoint(final)["step"]) >= steps


def ensure_trained(cfg: Config, pretrained: str | Path | None = None) -> Text2ImgModel:
    """Train when the default run has no final checkpoint of ``text2img.train_steps`` steps
    (a killed run resumes, a shorter one continues), then load."""
    run_dir = default_run_dir(cfg, pretrained)
    if (not is_trained(run_dir, cfg.text2img.train_steps)
            or not fingerprint.check_run(run_dir, training_stamp(cfg), rebuild_command(cfg, pretrained))):
        train(cfg, pretrained, run_dir)
    return load(cfg, run_dir, pretrained)
