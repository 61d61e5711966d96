"""Chapter 07: train and sample the text-to-image LDM of nodule ROIs (Urata et al.).

Training (Stable Diffusion's objective, noise prediction)::

    z_0 = E(x) * scale,   z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps,
    L = || eps - eps_theta(z_t, t, tau(prompt)) ||^2,   prompt -> "" with probability p (CFG dropout)

Sampling with classifier-free guidance at scale s::

    eps_hat = eps_theta(z_t, t, tau(prompt)) + (s - 1) (eps_theta(z_t, t, tau(prompt)) - eps_theta(z_t, t, tau("")))

(the same as ``uncond + s (cond - uncond)``, written so s = 1 is the conditional prediction exactly).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lungsynth import paths
from lungsynth.config import Config
from lungsynth.diffusion.samplers import cfg_combine
from lungsynth.engine import TrainTask, Trainer, load_weights
from lungsynth.methods.text2img.encoders import LatentCodec, TextEncoder
from lungsynth.methods.text2img.model import (Text2ImgModel, build_unet, load_pretrained_parts, pipeline_summary,
                                              sample_scheduler, train_scheduler)
from lungsynth.runtime import RunRecord, device as default_device

KIND = "text2img"


def default_run_dir(cfg: Config, pretrained: str | Path | None = None) -> Path:
    return paths.run_dir(cfg.profile, "07_text2img" + ("_sd" if pretrained else ""))


def course_codec(cfg: Config) -> LatentCodec:
    """The frozen 2D KL-VAE of chapter 02 (trained there when missing) as a latent codec."""
    from lungsynth.autoencoders import ensure_autoencoder

    vae = ensure_autoencoder("vae2d", cfg)
    return LatentCodec(vae, vae.scale_factor, sd=False)


def build_model(cfg: Config, pretrained: str | Path | None = None) -> Text2ImgModel:
    """The U-Net with its frozen text encoder and codec; from a local SD folder when given."""
    c = cfg.text2img
    if pretrained:
        unet, text, codec, sched = load_pretrained_parts(pretrained)
        latent_channels = int(unet.config.in_channels)
        latent_size = cfg.data.roi_size // 8  # the SD VAE downsamples x8
        source = str(Path(pretrained).resolve())
    else:
        text, codec = TextEncoder.minilm(), course_codec(cfg)
        latent_channels, latent_size = cfg.autoencoders.latent_channels, cfg.data.roi_size // 4
        unet = build_unet(tuple(c.unet_channels), c.layers_per_block, text.dim, latent_channels, latent_size,
                          c.attention_head_dim)
        sched, source = train_scheduler(c.num_train_timesteps), "course"
    return Text2ImgModel(unet, text, codec, sched, latent_channels, latent_size, source)


def model_config(model: Text2ImgModel) -> dict[str, Any]:
    """What built the U-Net's weights (compared when loading)."""
    return {"source": model.source, "text_encoder": model.text.name, "latent_channels": model.latent_channels,
            "latent_size": model.latent_size,
            "unet": {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.unet.config.items()
                     if k in ("block_out_channels", "layers_per_block", "cross_attention_dim", "in_channels")}}


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
        return {"loss": F.mse_loss(pred.float(), noise)}

    def config(self) -> dict[str, Any]:
        return model_config(self.model)


def roi_dataset(cfg: Config, split: str):
    """The chapter 01 ROI view (image [1,R,R] in [0,1], scores, prompt); prepared when missing."""
    from lungsynth.data.datasets import RoiDataset, ensure_prepared

    ensure_prepared(cfg)
    return RoiDataset(cfg, split)


def train(cfg: Config, pretrained: str | Path | None = None, run_dir: Path | None = None,
          max_steps: int | None = None, fresh: bool = False, data=None) -> Path:
    """Train (or fine-tune a local SD U-Net, AdamW lr ``cfg.text2img.pretrained_lr``); returns the run dir.

    ``data`` (items with "image" [1,R,R] and "prompt") defaults to the training ROIs of chapter 01.
    """
    run_dir = Path(run_dir or default_run_dir(cfg, pretrained))
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


def load(cfg: Config, run_dir: Path | None = None, pretrained: str | Path | None = None) -> Text2ImgModel:
    """The trained model of ``run_dir`` (weights-only load; refuses another kind or architecture)."""
    run_dir = Path(run_dir or default_run_dir(cfg, pretrained))
    model = build_model(cfg, pretrained)
    load_weights(run_dir, kind=KIND, config=model_config(model), modules={"unet": model.unet})
    model.unet.eval()
    return model


def is_trained(run_dir: Path, steps: int) -> bool:
    """Whether ``run_dir`` holds a final checkpoint of at least ``steps`` optimiser steps."""
    from lungsynth.engine import load_checkpoint

    final = Path(run_dir) / "final.pt"
    return final.is_file() and int(load_checkpoint(final)["step"]) >= steps


def ensure_trained(cfg: Config, pretrained: str | Path | None = None) -> Text2ImgModel:
    """Train when the default run has no final checkpoint of ``text2img.train_steps`` steps
    (a killed run resumes, a shorter one continues), then load."""
    run_dir = default_run_dir(cfg, pretrained)
    if not is_trained(run_dir, cfg.text2img.train_steps):
        train(cfg, pretrained, run_dir)
    return load(cfg, run_dir, pretrained)


def guided_noise(unet: nn.Module, z: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                 null_context: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guided noise prediction; ``guidance_scale == 1`` is the conditional one exactly."""
    cond = unet(z, t, encoder_hidden_states=context).sample
    if guidance_scale == 1.0:
        return cond
    uncond = unet(z, t, encoder_hidden_states=null_context).sample
    return cfg_combine(cond, uncond, guidance_scale)


@torch.no_grad()
def generate(model: Text2ImgModel, prompts: Sequence[str], guidance_scale: float = 5.0, steps: int = 50,
             sampler: str = "ddim", seed: int = 0, device: torch.device | None = None) -> torch.Tensor:
    """ROIs for ``prompts``: [B, 1, R, R] in [0, 1]. Deterministic for a seed (DDIM eta 0, PNDM)."""
    device = device or default_device()
    model.to(device)
    model.unet.eval()
    sched = sample_scheduler(sampler, model.scheduler)
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    shape = (len(prompts), model.latent_channels, model.latent_size, model.latent_size)
    z = (torch.randn(shape, generator=gen) * sched.init_noise_sigma).to(device)
    context = model.text(list(prompts)).to(device)
    null = model.text([""] * len(prompts)).to(device) if guidance_scale != 1.0 else None
    for t in sched.timesteps:
        z_in = sched.scale_model_input(z, t)
        eps = guided_noise(model.unet, z_in, t.to(device).expand(len(prompts)), context, null, guidance_scale)
        z = sched.step(eps, t, z).prev_sample
    return model.codec.decode(z).float().cpu()
