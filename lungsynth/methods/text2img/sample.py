"""Chapter 07's sampling: load a trained run, generate ROIs from prompts with classifier-free guidance.

Sampling with classifier-free guidance at scale s (the paper's guidance scale GS, swept over
5, 10, 20, ..., 60 in §2.3)::

    eps_hat = eps_theta(z_t, t, tau(prompt)) + (s - 1) (eps_theta(z_t, t, tau(prompt)) - eps_theta(z_t, t, tau("")))

(the same as ``uncond + s (cond - uncond)``, written so s = 1 is the conditional prediction exactly),
then ``x = D(z_0 / scale)`` through the frozen codec (``scale`` the latent scale factor).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from lungsynth.config import Config
from lungsynth.diffusion.samplers import cfg_combine
from lungsynth.engine import load_weights
from lungsynth.methods.text2img.model import (KIND, Text2ImgModel, build_model, default_run_dir, model_config,
                                              sample_scheduler, selected_checkpoint)
from lungsynth.runtime import autocast
from lungsynth.runtime import device as default_device


def load(cfg: Config, run_dir: Path | None = None, pretrained: str | Path | None = None) -> Text2ImgModel:
    """The trained model of ``run_dir`` with its selected weights (:func:`~.model.selected_checkpoint`: the lowest
    validation KID, else the last step); weights-only load, refusing another kind or architecture."""
    run_dir = Path(run_dir or default_run_dir(cfg, pretrained))
    model = build_model(cfg, pretrained)
    load_weights(selected_checkpoint(run_dir), kind=KIND, config=model_config(model), modules={"unet": model.unet})
    model.unet.eval()
    model.run_dir = run_dir  # the evaluation checks whom it was trained on
    return model


# Classifier-free guidance (§2.3: the guidance scale GS trades diversity for fidelity to the text).
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
    if not float(guidance_scale) > 0:
        raise ValueError(f"guidance_scale {guidance_scale}: expected a scale > 0 (1 is the conditional prediction; "
                         "the paper sweeps 5..60 and finds 5 best)")
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
        with autocast(device):  # the U-Net in bf16 where the device runs it fast; the update in fp32
            eps = guided_noise(model.unet, z_in, t.to(device).expand(len(prompts)), context, null,
                               guidance_scale).float()
        z = sched.step(eps, t, z).prev_sample
    with autocast(device):
        return model.codec.decode(z).float().cpu()
