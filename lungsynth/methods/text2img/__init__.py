"""Chapter 07 — text-to-image latent diffusion of nodule ROIs from prompts written from LIDC scores.

Urata et al. fine-tune Stable Diffusion on LIDC nodule ROIs (the centre slice, side twice the
nodule's diameter, §2.2) with prompts written from five radiologist scores (sphericity, texture,
margin, spiculation, calcification), and sweep the classifier-free guidance scale (GS = 5 .. 60,
best at 5, §2.3, Table 1). The course trains the same architecture with the packaged MiniLM text
encoder on the 2D KL-VAE of chapter 02, or fine-tunes a local Stable Diffusion folder as the paper
does. The paper prints no numbered equations; these are Stable Diffusion's.

Training (the frozen encoder E with its latent scale factor, the frozen text encoder tau)::

    z_0 = scale * E(x),   z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps,   eps ~ N(0, I)
    L = || target - f_theta(z_t, t, tau(y)) ||^2,   y -> "" with probability p (prompt dropout)

where the target is what the scheduler's ``prediction_type`` says the U-Net outputs: eps (SD 1.x, the
course's own U-Net) or v = sqrt(abar_t) eps - sqrt(1 - abar_t) z_0 (SD 2.0 at 768, the paper's best model),
so training and sampling read the output the same way. ROIs are augmented with 90/180/270-degree rotations
and horizontal flips (§2.2); DDPM betas scaled-linear 0.00085 .. 0.012 over 1000 steps; fine-tuning uses
AdamW at lr 1e-6 (§2.3). Every ``text2img.val_every`` steps the validation KID is measured and the lowest
checkpoint kept in ``best.pt``, which sampling loads (the paper stopped on validation KID, §2.3).

Sampling (DDIM or PNDM) with classifier-free guidance at scale s (on eps or v alike)::

    f_hat = f_theta(z_t, t, tau(y)) + (s - 1) (f_theta(z_t, t, tau(y)) - f_theta(z_t, t, tau("")))
          = f_theta(z_t, t, tau("")) + s (f_theta(z_t, t, tau(y)) - f_theta(z_t, t, tau("")))

so s = 1 is the conditional prediction exactly; the ROI is x = D(z_0 / scale) through the
frozen decoder. Prompt adherence is measured as attribute recovery (classifiers trained on real ROIs
predict each prompted level from the generated image; balanced accuracy against chance and against real
ROIs); LPIPS, CLIPScore and BioCLIPScore run where their weights are in local folders
(:mod:`lungsynth.eval.pretrained_metrics`) and are reported as not available otherwise. Quality gates
(:func:`quality_gates`, ``runs/<profile>/07_text2img_gates.json``): adherence for texture and
calcification, KID against a pixel-shuffle baseline, and the nodule spanning half the ROI.

Public API::

    from lungsynth.methods import text2img
    model = text2img.ensure_trained(cfg)                       # or train(cfg, pretrained=DIR), from .train
    rois = text2img.generate(model, prompts, guidance_scale=5)  # [B, 1, R, R] in [0, 1]
    rows = text2img.guidance_sweep(cfg, model)                  # the Table-1-shaped metrics (validation split)
    gates = text2img.quality_gates(cfg)                         # the chapter's gates (test split, best scale)
    text2img.sweep_table(rows); text2img.guidance_grid(rows)    # the table and its figure

Rooms: :mod:`.model` (text encoder, latent codec, U-Net, schedulers, pipeline folder check,
``build_model``), :mod:`.train` (ROI dataset, augmentation, prompt dropout, the engine task,
the validation KID, ``train`` / ``ensure_trained``), :mod:`.sample` (``load``, guided noise, ``generate``),
:mod:`.evaluate` (the guidance sweep, prompt adherence, the gates), :mod:`.plots`, :mod:`.method` (the face for chapters
08-11), :mod:`.cli` (``lungsynth text2img``), :mod:`.bench` (``lungsynth bench text2img``).
"""

from __future__ import annotations

from lungsynth.exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "model": ("KIND", "MAX_TOKENS", "PIPELINE_PARTS", "LatentCodec", "Text2ImgModel", "TextEncoder", "build_model",
              "build_unet", "check_pipeline_folder", "course_codec", "default_run_dir", "load_pretrained_parts",
              "model_config", "pipeline_summary", "sample_scheduler", "train_scheduler", "PREDICTION_TYPES",
              "diffusion_loss", "nodule_disk_weight", "selected_checkpoint", "training_target"),
    "train": ("Text2ImgTask", "ValidationKid", "augment", "drop_prompts", "ensure_trained", "is_trained", "oriented",
              "roi_dataset", "roi_feature_net", "selected_checkpoint_info", "train"),
    "sample": ("generate", "guided_noise", "load"),
    "evaluate": ("N_LEVELS", "AttributeClassifier", "adherence", "attribute_recovery", "balanced_accuracy",
                 "best_scale", "class_weights", "evaluation_tools", "geometry_misses", "geometry_share", "guidance_sweep",
                 "measure_gates",
                 "nodule_diameter_ratio", "quality_gates", "score_labels", "stack_images", "sweep_table",
                 "train_attribute_classifier"),
    "plots": ("guidance_grid", "prompt_grid", "sweep_curves"),
})
