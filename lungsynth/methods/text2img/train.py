"""Chapter 07's training: the ROI view of the data, augmentation, prompt dropout, the engine task, validation KID.

Stable Diffusion's objective (Urata et al. fine-tune the U-Net with it, §2.3)::

    z_0 = E(x) * scale,   z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps,
    L = || target - f_theta(z_t, t, tau(prompt)) ||^2,   prompt -> "" with probability p (CFG dropout)

with the target the scheduler names (eps, or v for SD 2.0's v-models: :func:`~.model.training_target`), the
nodule's disk weighted by ``text2img.nodule_weight`` (:func:`~.model.nodule_disk_weight`; 1: as printed) and the
paper's augmentation (90/180/270-degree rotations and horizontal flips, §2.2). Fine-tuning a local Stable
Diffusion U-Net uses AdamW at ``cfg.text2img.pretrained_lr`` (1e-6, §2.3). Training stops the paper's way:
the validation KID (:class:`ValidationKid`) every ``text2img.val_every`` steps, the lowest kept in ``best.pt``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from lungsynth import run_settings
from lungsynth.config import Config
from lungsynth.data import fingerprint
from lungsynth.data.datasets import training_stamp
from lungsynth.engine import TrainTask, Trainer
from lungsynth.methods.text2img.model import (KIND, Text2ImgModel, autoencoders_of, build_model, default_run_dir,
                                              diffusion_loss, model_config, pipeline_summary, selected_checkpoint)
from lungsynth.methods.text2img.sample import generate, load
from lungsynth.runtime import RunRecord


# §2.2: rotation (90, 180, 270 degrees) and horizontal flipping of the training ROIs.
def augment(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random 90-degree rotation and horizontal flip per image (the paper's augmentation). [B,1,H,W]; the draws come
    from ``generator`` (CPU) when given, else the global RNG."""
    out = []
    for image in images:
        image = torch.rot90(image, int(torch.randint(0, 4, (), generator=generator).item()), dims=(-2, -1))
        out.append(image.flip(-1) if torch.rand((), generator=generator) < 0.5 else image)
    return torch.stack(out) if out else images


def oriented(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Real ROIs [N,1,R,R] each under a random one of the generator's training orientations (:func:`augment`),
    seeded: the distribution the generator learns, so real references compare with it without orientation
    moving FID (the feature network is trained to recognise rotations)."""
    return augment(images, generator=torch.Generator().manual_seed(int(seed)))


def roi_feature_net(cfg: Config, train_images: torch.Tensor):
    """The 2D slice network of FID/KID for ROIs: rotation-prediction pretext on the oriented training ROIs
    (``cfg.evaluation.slice_net_steps``); deterministic for the seed, so validation and evaluation share it."""
    from lungsynth.eval.features import train_slice_net

    return train_slice_net(oriented(train_images, cfg.seed), steps=cfg.evaluation.slice_net_steps, seed=cfg.seed,
                           progress=False)


# §2.3: "Based on the convergence of the KID score on the validation data, training was terminated".
class ValidationKid:
    """KID of ROIs generated for validation prompts against the (oriented) validation ROIs; ``__call__(model)``
    -> float. The engine validates every ``text2img.val_every`` steps and keeps the lowest in ``best.pt``."""

    def __init__(self, real: torch.Tensor, prompts: Sequence[str], net, guidance_scale: float, steps: int,
                 sampler: str, seed: int = 0) -> None:
        from lungsynth.eval.features import slice_features

        self.prompts, self.net, self.guidance_scale = list(prompts), net, float(guidance_scale)
        self.steps, self.sampler, self.seed = int(steps), sampler, int(seed)
        self.real_features, self.network = slice_features(oriented(real, seed), net)

    @classmethod
    def from_config(cls, cfg: Config) -> "ValidationKid":
        """``text2img.val_samples`` prompts of the validation ROIs (cycled), guidance ``text2img.val_guidance``."""
        val, train_data = roi_dataset(cfg, "val"), roi_dataset(cfg, "train")
        if not len(val):
            raise ValueError("the validation split has no ROIs, so training cannot stop on validation KID; prepare "
                             "more scans or set text2img.val_every=0")
        real = torch.stack([val[i]["image"] for i in range(len(val))])
        prompts = [val[i % len(val)]["prompt"] for i in range(int(cfg.text2img.val_samples))]
        net = roi_feature_net(cfg, torch.stack([train_data[i]["image"] for i in range(len(train_data))]))
        c = cfg.text2img
        return cls(real, prompts, net, c.val_guidance, c.sample_steps, c.sampler, cfg.seed)

    def __call__(self, model: Text2ImgModel) -> float:
        from lungsynth.eval.distribution import kid
        from lungsynth.eval.features import slice_features

        device = next(model.unet.parameters()).device
        images = generate(model, self.prompts, self.guidance_scale, self.steps, self.sampler, seed=self.seed, device=device)
        fake, _ = slice_features(images, self.net)
        return float(kid(self.real_features, fake, subset_size=min(len(self.real_features), len(fake)),
                         network=self.network, min_samples_warn=0).value)


def drop_prompts(prompts: Sequence[str], p: float) -> list[str]:
    """Replace each prompt by the empty (unconditional) prompt with probability ``p``."""
    return ["" if torch.rand(()).item() < p else prompt for prompt in prompts]


class Text2ImgTask(TrainTask):
    """Noise prediction on ROI latents with prompt dropout; only the U-Net trains."""

    kind = KIND

    def __init__(self, model: Text2ImgModel, prompt_dropout: float = 0.1, augment_images: bool = True,
                 validation: ValidationKid | None = None, nodule_weight: float = 1.0) -> None:
        self.model, self.prompt_dropout, self.augment_images = model, float(prompt_dropout), augment_images
        self.validation, self.nodule_weight = validation, float(nodule_weight)

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
        # L = || target - f_theta(z_t, t, tau(y)) ||^2, y -> "" with probability p; target eps or v (§2.3);
        # the nodule's disk weighted by text2img.nodule_weight (1: as printed)
        return {"loss": diffusion_loss(self.model, z0, noise, t, context, self.nodule_weight)}

    def validation_step(self, batch: Any, step: int) -> dict[str, float] | None:
        """The validation KID (once per validation: ``batch`` is None), or nothing without a validator."""
        return {"kid": self.validation(self.model)} if self.validation is not None else None

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
          max_steps: int | None = None, fresh: bool = False, data=None, validation: ValidationKid | None = None) -> Path:
    """Train (or fine-tune a local SD U-Net, AdamW lr ``cfg.text2img.pretrained_lr``); returns the run dir.

    ``data`` (items with "image" [1,R,R] and "prompt") defaults to the training ROIs of chapter 01, and then
    ``validation`` to the validation KID of chapter 01's validation ROIs (when ``text2img.val_every`` > 0): every
    ``val_every`` steps it is measured and the lowest kept in ``best.pt``, which sampling loads.
    """
    run_dir = Path(run_dir or default_run_dir(cfg, pretrained))
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp = training_stamp(cfg) if data is None else None
    fresh = fingerprint.claim_run(run_dir, stamp, rebuild_command(cfg, pretrained), fresh=fresh)
    model = build_model(cfg, pretrained)
    c = cfg.text2img
    if validation is None and data is None and c.val_every:
        validation = ValidationKid.from_config(cfg)
    trainer = Trainer.from_config(cfg.engine, run_dir, max_steps=max_steps or c.train_steps,
                                  lr=c.pretrained_lr if pretrained else c.lr, batch_size=c.batch_size,
                                  seed=cfg.seed, fresh=fresh, warmup_steps=min(50, (max_steps or c.train_steps) // 10),
                                  val_every=int(c.val_every) if validation else None,
                                  keep_best="val_kid" if validation else None)
    data = data if data is not None else roi_dataset(cfg, "train")
    with RunRecord(run_dir, config=cfg.to_dict(), seed=cfg.seed) as record:
        if pretrained:
            record["pipeline"] = pipeline_summary(pretrained)
        result = trainer.fit(Text2ImgTask(model, c.prompt_dropout, validation=validation,
                                                nodule_weight=c.nodule_weight), data)
        record["train"] = {"steps": result.steps, "last_losses": result.last_losses, "seconds": result.seconds}
        record["selected"] = selected_checkpoint_info(run_dir)
    run_settings.record(run_dir, run_settings.training_settings(cfg, "text2img", autoencoders_of(pretrained)))
    return run_dir


def selected_checkpoint_info(run_dir: Path) -> dict[str, Any]:
    """Which checkpoint sampling loads (:func:`~.model.selected_checkpoint`) and why."""
    from lungsynth.engine import load_checkpoint

    path = selected_checkpoint(run_dir)
    best = load_checkpoint(path).get("best")
    return {"checkpoint": path.name, **({"step": best["step"], "val_kid": best["value"]} if best else
                                        {"why": "no validation KID: the last step"})}


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
    else:  # a longer budget continues above; any other change is refused
        wanted = run_settings.training_settings(cfg, "text2img", autoencoders_of(pretrained))
        run_settings.check_recorded(run_dir, wanted, rebuild_command(cfg, pretrained), ignore=("text2img.train_steps",))
    return load(cfg, run_dir, pretrained)
