"""The Stable Diffusion architecture for nodule ROIs: U-Net, schedulers, a local pipeline folder.

Built with diffusers because the architecture (and, where a user has them, the weights) of Stable
Diffusion is the point of chapter 07 (Urata et al.): ``UNet2DConditionModel`` denoises latents
while cross-attending to prompt embeddings; DDPM for training, DDIM or PNDM for sampling.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lungsynth.methods.text2img.encoders import LatentCodec, TextEncoder

# What `--pretrained DIR` needs: a diffusers Stable Diffusion folder (save_pretrained layout).
PIPELINE_PARTS = {"model_index.json": "file", "unet": "config.json", "vae": "config.json",
                  "text_encoder": "config.json", "tokenizer": None, "scheduler": "scheduler_config.json"}


def check_pipeline_folder(folder: str | Path) -> Path:
    """Raise a ValueError naming what is missing when ``folder`` is not a diffusers SD pipeline."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--pretrained {folder}: no such folder (expected a diffusers Stable "
                                "Diffusion pipeline saved with save_pretrained)")
    missing = []
    for part, inner in PIPELINE_PARTS.items():
        path = folder / part
        if inner == "file":
            if not path.is_file():
                missing.append(part)
        elif not path.is_dir() or (inner and not (path / inner).is_file()):
            missing.append(f"{part}/" + (inner or ""))
    if missing:
        raise ValueError(f"--pretrained {folder} is not a diffusers Stable Diffusion pipeline: missing "
                         f"{', '.join(missing)} (save one with StableDiffusionPipeline.save_pretrained)")
    return folder


def build_unet(channels: tuple[int, ...], layers_per_block: int, cross_attention_dim: int, latent_channels: int,
               sample_size: int, attention_head_dim: int = 8) -> nn.Module:
    """An SD-style ``UNet2DConditionModel``: cross-attention in every level but the deepest.

    Input z_t [B, latent_channels, s, s], timesteps [B], context [B, L, cross_attention_dim];
    output the predicted noise, same shape as z_t.
    """
    from diffusers import UNet2DConditionModel

    n = len(channels)
    down = tuple(["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"])
    up = tuple(["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1))
    return UNet2DConditionModel(sample_size=sample_size, in_channels=latent_channels, out_channels=latent_channels,
                                down_block_types=down, up_block_types=up, block_out_channels=tuple(channels),
                                layers_per_block=layers_per_block, cross_attention_dim=cross_attention_dim,
                                attention_head_dim=attention_head_dim, norm_num_groups=min(32, min(channels)))


def train_scheduler(num_train_timesteps: int = 1000, folder: Path | None = None):
    """Stable Diffusion's DDPM training scheduler (scaled-linear betas 0.00085..0.012)."""
    from diffusers import DDPMScheduler

    if folder is not None:
        return DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)


def sample_scheduler(kind: str, train_sched) -> Any:
    """DDIM or PNDM with the training scheduler's betas."""
    from diffusers import DDIMScheduler, PNDMScheduler

    if kind == "ddim":
        return DDIMScheduler.from_config(train_sched.config, clip_sample=False, set_alpha_to_one=False)
    if kind == "pndm":
        return PNDMScheduler.from_config(train_sched.config, skip_prk_steps=True)
    raise ValueError(f"unknown sampler {kind!r}; valid: ddim, pndm")


@dataclass
class Text2ImgModel:
    """Everything sampling needs: the trainable U-Net and its frozen companions."""

    unet: nn.Module
    text: TextEncoder
    codec: LatentCodec
    scheduler: Any  # the DDPM training scheduler
    latent_channels: int
    latent_size: int
    source: str  # "course" or the pretrained folder

    def to(self, device: torch.device) -> "Text2ImgModel":
        self.unet.to(device)
        self.text.to(device)
        self.codec.to(device)
        return self


def load_pretrained_parts(folder: str | Path) -> tuple[nn.Module, TextEncoder, LatentCodec, Any]:
    """U-Net, CLIP text encoder, SD VAE codec and DDPM scheduler from a local pipeline folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = check_pipeline_folder(folder)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
    scale = float(getattr(vae.config, "scaling_factor", 0.18215))
    return (unet, TextEncoder.from_stable_diffusion(str(folder)), LatentCodec(vae, scale, sd=True),
            train_scheduler(folder=folder))


def pipeline_summary(folder: str | Path) -> dict[str, Any]:
    """What a pipeline folder holds (class names from model_index.json), for run records."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    return {k: v for k, v in index.items() if not k.startswith("_")}
