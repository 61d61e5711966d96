"""Chapter 03 — LAND: 3D latent diffusion of chest CT conditioned on lung, nodule and texture masks.

The method (LAND, Oliveras et al., the poster ``/work/shared/papers/000_6102a2132f5ee72a.txt``; it numbers
no equations, so they are cited by section), on a MAISI-like 3D KL-VAE of chapter 02:

- latents of the frozen ``vae3d`` (posterior sampled at every load, ``s`` the latent scale factor),
  ``[4, S/4, S/4, S/4]`` (the paper: 256^3 -> 64^3 x 4)::

      z0 = s * (mu(x) + sigma(x) * eps'),   eps' ~ N(0, I)

- forward process on a linear beta schedule, T = 1000, ``ab_t = prod_{k<=t} (1 - beta_k)``, and the
  velocity target ("Velocity Prediction Training")::

      z_t = sqrt(ab_t) z0 + sqrt(1 - ab_t) eps,      v_t = sqrt(ab_t) eps - sqrt(1 - ab_t) z0

- Min-SNR-gamma weighting: ``L_min-SNR = gamma(SNR_t) ||v_hat_t(z_t, m) - v_t||^2``, here::

      L = E_{t, eps} [ min(SNR_t, gamma) / (SNR_t + 1) * || v_t - v_hat(z_t, c, t) ||^2 ],
      SNR_t = ab_t / (1 - ab_t),   gamma = 5 (cfg.land.min_snr_gamma)
  (``full``; smoke and course train the unweighted v MSE, ``cfg.land.loss_weighting = "uniform"``: the
  Min-SNR weight ~SNR_t at high noise leaves the anatomy-forming steps untrained in a CPU budget)

  i.e. the x0-space weight ``min(SNR, gamma)`` written in v-space (:mod:`lungsynth.diffusion.objectives`);
- the condition ``c``, on the latent grid, is concatenated to ``z_t`` and re-injected by cross-attention
  to its tokens ``tau(c)`` (:class:`lungsynth.nn.conditioning.MaskTokenizer`)::

      v_hat = f_theta([z_t, c], t, tau(c))

  in :class:`lungsynth.nn.unets.LandUNet`, a 5-level U-Net (two residual blocks per level) whose decoder
  adds its skips, ``h <- h + s``, instead of concatenating them, ``h <- [h, s]`` (less memory);
- sampling runs the reverse process from ``z_T ~ N(0, I)`` with DDIM (the course's default) or DDPM from
  the same checkpoint (the poster names no sampler), then decodes ``x = D(z0 / s)`` with the vae3d.

Variants (``VARIANTS``) and what they condition on, all derived from the prepared ``cond`` volume
(background 0, lung 0.5, nodule texture 1..5, divided by 5: ``cond`` in {0, 0.1, 0.2, ..., 1.0}):

=======================  =========================  =============================================
variant                  condition                  to the latent grid
=======================  =========================  =============================================
``none``                 none (unconditional)       —
``nodule-only``          nodule (binary)            3D max-pool x4, 1 channel (an ablation, not a
                                                    poster row): ``c = maxpool_4(1[cond > 0.15])``
``mask``                 nodule + lung              3D max-pool x4 (LAND-Mask), 1 channel: lung
                                                    0.1, nodules 1 (no texture)
``latentmask``           nodule + lung              mask VAE encoder (LAND-LatentMask); nodules
                                                    all given value 1 (no texture)
``latentmask-texture``   nodule + lung + texture    mask VAE encoder of ``cond`` itself (LAND+):
                                                    ``c = s_m * mu_m(cond)``
=======================  =========================  =============================================

What chapters 08-11 call::

    from lungsynth.methods import land
    run = land.ensure_trained(cfg, "latentmask-texture")        # trains when missing, resumes if killed
    model = land.load(cfg, "latentmask-texture")                # frozen, on the runtime device
    conds = land.heldout_conditions(cfg, "test")                # [N,1,S,S,S] prepared cond volumes
    out = land.sample(model, conds[:2], sampler="ddim", steps=50, seed=0)
    out["ct_hu"]   # [2,1,S,S,S] float32 HU;  out["ct"] in [0,1];  out["latents"] [2,4,S/4,S/4,S/4]

Rooms: :mod:`.model` (variants, condition validation and grids, the denoiser, its loss), :mod:`.train`
(the training view of the data, the engine task, ``train`` / ``ensure_trained``), :mod:`.sample`
(``load``, ``sample``, held-out conditions by nodule size, the texture sweep, peak sampling memory),
:mod:`.evaluate` (Table 1: FID, KID, MS-SSIM, peak memory; the chapter's quality gates), :mod:`.plots`
(figures), :mod:`.method` (the face for chapters 08-11), :mod:`.cli` (``lungsynth land``), :mod:`.bench`
(``lungsynth bench land``).
"""

from __future__ import annotations

from lungsynth.exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "model": ("VARIANTS", "CONDITIONS", "MAX_POOLED", "KIND", "SAMPLERS", "LandDenoiser", "check_variant",
              "uses_mask_vae", "cond_channels_of",
              "check_condition", "condition_volume", "condition_grid", "denoiser_spec", "make_scheduler",
              "land_loss", "loss_gamma", "LOSS_WEIGHTINGS"),
    "train": ("LandDataset", "LandTask", "build_dataset", "iter_conditions", "heldout_conditions", "HeldoutVolumes",
              "largest_nodule_indices", "default_run_dir",
              "train", "ensure_trained", "check_loss_weighting", "check_autoencoders", "autoencoder_digests"),
    "sample": ("LandModel", "check_trained_for", "load", "load_denoiser", "sample", "heldout_by_nodule_size",
               "nodule_mean_hu", "texture_sweep", "peak_sampling_memory"),
    "evaluate": ("evaluate", "real_volumes", "quality_gates"),
    "plots": ("nodule_slices", "plot_condition_grids", "plot_variants"),
    "bench": ("bench_land",),
    "cli": ("register",),
})
