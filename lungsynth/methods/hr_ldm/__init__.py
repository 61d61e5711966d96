"""Chapter 05 — HR-LDM: histogram-regularised latent inpainting of lung nodules by subtype.

Kannan et al., "Controllable Lung Nodule Synthesis via Histogram-Regularized Latent Diffusion
Models" (arXiv:2605.30631; equation numbers below are the paper's). No public code of the paper
exists; this package is the course's reference implementation of its Algorithm 1 (training) and
Algorithm 2 (inpainting).

The method. A denoiser ``eps_theta`` works in the latent space of a frozen 3D KL-VAE
(``z_0 = s E(x)``) on nodule-centred crops, with three conditions: the subtype ``y`` (an embedding
added to the time embedding), the target HU histogram ``h`` (one cross-attention token
``c_hist = MLP(h)``, eq. 3) and the 3-channel nodule mask concatenated to the latent (``M`` = its
nodule channel on the latent grid). Training noises only the lesion and adds a histogram term::

    z_t      = sqrt(ab_t) z_0 + sqrt(1 - ab_t) eps,     eps ~ N(0, I)                  (1)
    z~_t     = (1 - M) z_0 + M z_t                         lesion-only noise             (4)
    L_inp    = sum |M (eps - eps_theta([z~_t, M], t, y, h))| / (sum M + delta)          (5)
    z^_0     = (z~_t - sqrt(1 - ab_t) eps_theta) / sqrt(ab_t)   (inside M)              (6)
    h_k      = sum_{i in S} max(0, 1 - |f_i - mu_k| / w) / |S|,  f = D_trunc(z), S = lesion  (7)
    L_hist   = JSD(p, q) = KL(p || a) / 2 + KL(q || a) / 2,   a = (p + q) / 2,
               p = H(D_trunc(z^_0)),  q = H(D_trunc(z_0))                               (8)
    L_total  = L_inp + lambda_hist L_hist,   lambda_hist = 10                           (9)

``D_trunc`` is a frozen copy of the VAE's ``post_quant_conv`` and decoder cut after its penultimate
residual block (before the last upsampling); without ``L_hist`` the model is the
paper's MAISI-DDPM ablation. Inference (Algorithm 2) takes a healthy scan (on phantom data the scan's
healthy twin), draws a centre in the eroded lung (or the sub-pleural rim), a real 6-30 mm nodule shape
of the requested subtype and size and a real target histogram of the subtype, starts from
``z_T ~ N(0, I)`` and re-anchors the background after every reverse step::

    z_{t-1} <- M z_{t-1} + (1 - M) q(z_bg, t - 1),   z_bg = s E(crop)                   (10)

then decodes ``x^ = D(z_0)`` and pastes the generated region back into the scan.

What later chapters (08-11) call to put nodules of a chosen subtype into real CT::

    from lungsynth.methods import hr_ldm
    model = hr_ldm.load(cfg, hr_ldm.ensure_trained(cfg))          # HR-LDM (hist_loss=False: ablation)
    library = hr_ldm.NoduleLibrary.from_prepared(cfg, "train")     # real shapes + target histograms
    res = hr_ldm.inpaint_volume(model, healthy_hu, lung, subtype=2, spacing_mm=cfg.data.spacing_3d_mm,
                                library=library, size_range_mm=(10, 20), seed=0)  # real LIDC: exclude=label > 0
    res.ct_hu, res.nodule_mask, res.hrmask, res.centre          # new volume [D,H,W] and its labels

Command line: ``lungsynth hr-ldm train|inpaint|evaluate --profile P [--no-hist-loss]``.

Rooms: :mod:`.model` (histograms, condition checks, networks, the loss, eq. 1-9), :mod:`.train`
(latent cache, the engine task, ``train`` / ``ensure_trained``, run dirs), :mod:`.sample` (``load``,
Algorithm 2: centres, the nodule library, the inpainting loop), :mod:`.evaluate` (the ablation
table), :mod:`.plots` (figures), :mod:`.method` (the face for chapters 08-11), :mod:`.cli`
(``lungsynth hr-ldm``), :mod:`.bench` (``lungsynth bench hr-ldm``).

Names are imported lazily (PEP 562) so ``lungsynth --help`` does not import torch.
"""

from __future__ import annotations

from lungsynth.exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "model": ("SUBTYPES", "HIST_BINS", "HIST_RANGE_HU", "bin_centres", "hu_histogram", "soft_histogram",
              "js_divergence", "js_divergence_np", "feature_histograms", "validate_histogram", "validate_subtype",
              "validate_mask_in_lung", "HistogramEncoder", "HrLdmNet", "TruncatedDecoder", "crop_side",
              "hr_ldm_losses", "inpaint_l1", "make_schedulers", "mask_to_latent", "net_spec"),
    "train": ("HrLdmTask", "LatentCache", "build_latent_cache", "default_run_dir", "run_name", "train_crops", "train",
              "ensure_trained"),
    "sample": ("SIZE_BINS_MM", "HrLdm", "InpaintResult", "NoduleLibrary", "load", "candidate_centres", "sample_centre",
               "place_mask", "latent_region", "inpaint_crops", "inpaint_latent", "inpaint_volume"),
    "evaluate": ("evaluate", "eval_items", "generate_for_eval", "metrics_for", "disjoint_halves", "pick_per_subtype",
                 "median_hu", "subtype_jsd", "ring_change", "mean_paste", "placement_trials", "quality_gates"),
    "plots": ("plot_soft_histogram", "plot_inpaint_steps", "plot_subtype_size_grid", "plot_histograms",
              "subtype_size_grid"),
})
