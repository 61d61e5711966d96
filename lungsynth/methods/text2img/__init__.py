"""Chapter 07 — text-to-image latent diffusion of nodule ROIs from prompts written from LIDC scores.

Urata et al. fine-tune Stable Diffusion on LIDC nodule ROIs (the centre slice, side twice the
nodule's diameter, §2.2) with prompts written from five radiologist scores (sphericity, texture,
margin, spiculation, calcification), and sweep the classifier-free guidance scale (GS = 5 .. 60,
best at 5, §2.3, Table 1). The course trains the same architecture with the packaged MiniLM text
encoder on the 2D KL-VAE of chapter 02, or fine-tunes a local Stable Diffusion folder as the paper
does. The paper prints no numbered equations; these are Stable Diffusion's.

Training (noise prediction; the frozen encoder E with its latent scale factor, the frozen text encoder tau)::

    z_0 = scale * E(x),   z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps,   eps ~ N(0, I)
    L = || eps - eps_theta(z_t, t, tau(y)) ||^2,   y -> "" with probability p (prompt dropout)

on ROIs augmented with 90/180/270-degree rotations and horizontal flips (§2.2), DDPM betas
scaled-linear 0.00085 .. 0.012 over 1000 steps; fine-tuning uses AdamW at lr 1e-6 (§2.3).

Sampling (DDIM or PNDM) with classifier-free guidance at scale s::

    eps_hat = eps_theta(z_t, t, tau(y)) + (s - 1) (eps_theta(z_t, t, tau(y)) - eps_theta(z_t, t, tau("")))
            = eps_theta(z_t, t, tau("")) + s (eps_theta(z_t, t, tau(y)) - eps_theta(z_t, t, tau("")))

so s = 1 is the conditional prediction exactly; the ROI is x = D(z_0 / scale) through the
frozen decoder. Text consistency is measured as attribute recovery (a classifier trained on real
ROIs predicts each prompted level from the generated image), since CLIPScore and BiomedCLIP need
weights that cannot be had offline.

Public API::

    from lungsynth.methods import text2img
    model = text2img.ensure_trained(cfg)                       # or train(cfg, pretrained=DIR), from .train
    rois = text2img.generate(model, prompts, guidance_scale=5)  # [B, 1, R, R] in [0, 1]
    rows = text2img.guidance_sweep(cfg, model)                  # the Table-1-shaped metrics
    text2img.sweep_table(rows); text2img.guidance_grid(rows)    # the table and its figure

Rooms: :mod:`.model` (text encoder, latent codec, U-Net, schedulers, pipeline folder check,
``build_model``), :mod:`.train` (ROI dataset, augmentation, prompt dropout, the engine task,
``train`` / ``ensure_trained``), :mod:`.sample` (``load``, guided noise, ``generate``),
:mod:`.evaluate` (the guidance sweep), :mod:`.plots`, :mod:`.method` (the face for chapters
08-11), :mod:`.cli` (``lungsynth text2img``), :mod:`.bench` (``lungsynth bench text2img``).
"""

from __future__ import annotations

from lungsynth.exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "model": ("KIND", "MAX_TOKENS", "PIPELINE_PARTS", "LatentCodec", "Text2ImgModel", "TextEncoder", "build_model",
              "build_unet", "check_pipeline_folder", "course_codec", "default_run_dir", "load_pretrained_parts",
              "model_config", "pipeline_summary", "sample_scheduler", "train_scheduler"),
    "train": ("Text2ImgTask", "augment", "drop_prompts", "ensure_trained", "is_trained", "roi_dataset", "train"),
    "sample": ("generate", "guided_noise", "load"),
    "evaluate": ("N_LEVELS", "AttributeClassifier", "attribute_recovery", "guidance_sweep", "score_labels",
                 "stack_images", "sweep_table", "train_attribute_classifier"),
    "plots": ("guidance_grid",),
})
