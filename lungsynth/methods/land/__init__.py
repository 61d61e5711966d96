"""Chapter 03 — LAND: 3D latent diffusion of chest CT conditioned on lung, nodule and texture masks.

The method (LAND, on a MAISI-like 3D KL-VAE of chapter 02):

- latents ``z0 = s * (mu + sigma * eps)`` of the frozen ``vae3d`` (posterior sampled at every load,
  ``s`` the latent scale factor), ``[4, S/4, S/4, S/4]``;
- v-prediction: the denoiser predicts ``v = sqrt(ab_t) eps - sqrt(1 - ab_t) z0`` from
  ``z_t = sqrt(ab_t) z0 + sqrt(1 - ab_t) eps`` on a linear beta schedule, T = 1000;
- Min-SNR-gamma weighting: ``L = E_t[ min(SNR_t, gamma) / (SNR_t + 1) * ||v - v_hat||^2 ]`` with
  ``SNR_t = ab_t / (1 - ab_t)`` and gamma = 5 (``cfg.land.min_snr_gamma``), i.e. the x0-space weight
  ``min(SNR, gamma)`` written in v-space (:mod:`lungsynth.diffusion.objectives`);
- the condition, on the latent grid, is concatenated to ``z_t`` and re-injected by cross-attention
  (:class:`lungsynth.nn.conditioning.MaskTokenizer` tokens) in :class:`lungsynth.nn.unets.LandUNet`,
  a 5-level U-Net with additive skips.

Variants (``VARIANTS``) and what they condition on, all derived from the prepared ``cond`` volume
(background 0, lung 0.5, nodule texture 1..5, divided by 5):

=======================  =========================  =============================================
variant                  condition                  to the latent grid
=======================  =========================  =============================================
``none``                 none (unconditional)       —
``mask``                 nodule (binary)            3D max-pool x4 (LAND-Mask), 1 channel
``latentmask``           nodule + lung              mask VAE encoder (LAND-LatentMask); nodules
                                                    all given value 1 (no texture)
``latentmask-texture``   nodule + lung + texture    mask VAE encoder of ``cond`` itself (LAND+)
=======================  =========================  =============================================

What chapters 08-11 call::

    from lungsynth.methods import land
    run = land.ensure_trained(cfg, "latentmask-texture")        # trains when missing, resumes if killed
    model = land.load(cfg, "latentmask-texture")                # frozen, on the runtime device
    conds = land.heldout_conditions(cfg, "test")                # [N,1,S,S,S] prepared cond volumes
    out = land.sample(model, conds[:2], sampler="ddim", steps=50, seed=0)
    out["ct_hu"]   # [2,1,S,S,S] float32 HU;  out["ct"] in [0,1];  out["latents"] [2,4,S/4,S/4,S/4]
"""

from __future__ import annotations

from lungsynth.methods.land.cli import register
from lungsynth.methods.land.table import (_bench_child, _child, bench_land, evaluate,
                                             peak_sampling_memory)
from lungsynth.methods.land.model import (CONDITIONS, KIND, SAMPLERS, VARIANTS, LandDataset, LandDenoiser,
                                          LandTask, build_dataset, check_condition, check_variant,
                                          condition_grid, condition_volume, default_run_dir, denoiser_spec,
                                          heldout_by_nodule_size, heldout_conditions, land_loss, make_scheduler,
                                          real_volumes, uses_mask_vae)
from lungsynth.methods.land.pipeline import (LandModel, ensure_trained, load, load_denoiser, nodule_mean_hu,
                                             nodule_slices, sample, texture_sweep, train)

__all__ = [
    "VARIANTS", "CONDITIONS", "KIND", "SAMPLERS", "LandDenoiser", "LandTask", "LandDataset", "LandModel",
    "check_variant", "uses_mask_vae", "check_condition", "condition_volume", "condition_grid", "denoiser_spec",
    "make_scheduler", "land_loss", "build_dataset", "heldout_conditions", "heldout_by_nodule_size",
    "real_volumes", "default_run_dir", "train", "ensure_trained", "load", "load_denoiser", "sample",
    "texture_sweep", "nodule_mean_hu", "nodule_slices", "evaluate", "peak_sampling_memory", "bench_land",
    "register",
]
