"""Chapter 07 — text-to-image latent diffusion of nodule ROIs from prompts written from LIDC scores.

Public API::

    from lungsynth.methods import text2img
    model = text2img.ensure_trained(cfg)                       # or train(cfg, pretrained=DIR)
    rois = text2img.generate(model, prompts, guidance_scale=5)  # [B, 1, R, R] in [0, 1]
    rows = text2img.guidance_sweep(cfg, model)                  # the Table-1-shaped metrics
"""

from lungsynth.methods.text2img.core import (KIND, Text2ImgTask, augment, build_model, default_run_dir,
                                             drop_prompts, ensure_trained, generate, guided_noise, load, train)
from lungsynth.methods.text2img.model import check_pipeline_folder

__all__ = ["KIND", "Text2ImgTask", "augment", "build_model", "check_pipeline_folder", "default_run_dir",
           "drop_prompts", "ensure_trained", "generate", "guided_noise", "load", "train"]
