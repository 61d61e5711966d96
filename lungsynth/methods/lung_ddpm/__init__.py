"""Chapter 06 — Lung-DDPM: a pixel-space 3D DDPM with anatomically aware sampling (AAS).

Lung-DDPM generates a whole CT volume ``x`` [B, 1, S, S, S] (course scale [0, 1], trained in [-1, 1])
from a *semantic layout* ``y`` [B, 1, S, S, S] with values 0 (background), 1 (lung) and 2 (nodule).
Equation numbers are the paper's (Lung-DDPM, Sec. II-B to II-D and III-B):

- forward diffusion (eqs. 1-2): ``q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)``, so any step is
  drawn from the data at once, ``x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps`` with ``eps ~ N(0, I)``,
  ``alpha_t = 1 - beta_t`` and ``ab_t = prod_{k <= t} alpha_k``; cosine schedule (Nichol & Dhariwal 2021),
  T = 250.
- training (paper Alg. 1): the 3D U-Net ``eps_theta`` (MONAI ``DiffusionModelUNet`` with residual and
  attention blocks, through :func:`lungsynth.nn.unets.diffusion_unet`) reads ``x_t (+) m = cat[x_t, onehot(y)]``
  and predicts ``eps``; the loss is eq. 7, ``L(theta) = E_{x_0, eps, t} |eps - eps_theta(x_t (+) m, t)|_1``;
  EMA 0.995 (the engine's :class:`~lungsynth.engine.EMA`); sampling uses the EMA weights.
- a reverse step (eqs. 3-4): ``x_{t-1}^model = (x_t - (1 - alpha_t) / sqrt(1 - ab_t) eps_theta(x_t (+) m, t))
  / sqrt(alpha_t) + sigma_t z`` (MONAI's DDPM step: the same mean, computed through the predicted ``x_0``
  clipped to [-1, 1]).
- sampling with AAS (paper Alg. 2): the reference forward-diffused to t-1 (eq. 5),
  ``q(x_ref, t-1) = sqrt(ab_{t-1}) x_ref + sqrt(1 - ab_{t-1}) eps``, is blended in after each reverse step
  (eq. 6), ``x_{t-1} = m_l * x_{t-1}^model + m_e * q(x_ref, t-1)``, with ``m_l`` the lung (lung or nodule in
  the layout) and ``m_e = 1 - m_l`` (the shared hook :func:`lungsynth.diffusion.samplers.anatomically_aware`),
  for every step with ``t <= blend_from``. At the end (t-1 = -1 means the clean data) the volume equals the
  reference outside the lungs exactly.

Ablations (the paper's Table IV): sampling without AAS (``aas=False``, same weights) and a model
trained without the lung in its layout (variant ``"no_lung_layout"``: lung voxels become background,
the layout has background and nodule only), sampled as the reference code does: AAS generates the nodule
only and takes the lung from the reference too.

Samplers: ``"ddpm"`` (the paper's, all 250 steps in ``full``) and ``"ddim"`` (deterministic DDIM, the fast
sampler); AAS anchors the reference at every step of both (``cfg.lung_ddpm.sampler``, ``sample_steps``).

Public API (chapters 08-11)::

    model = load(cfg, variant="layout")          # trains first when the run has no final checkpoint
    x = model.sample(layout, reference, generator=torch.Generator().manual_seed(0))
    # layout [B or 1, 1, S, S, S] in {0, 1, 2}; reference [B or 1, 1, S, S, S] in [0, 1]; x in [0, 1]

Quality gates (:func:`quality_gates`, course profile; ``runs/<profile>/06_lung_ddpm_gates.json``): the lung's
HU-histogram JSD against the paired real volume, KID of lung-centred crops, nodule contrast and the seam
ratio, each against a baseline of the same volumes (voxels shuffled inside the body; the real floor).

Metrics (:func:`evaluate`): FID and MMD on 3D chest-CT features (:mod:`lungsynth.eval`), MSE inside
the lungs against the paired real volume, ``MSE = sum_i m_l(i) (x_real(i) - x_syn(i))^2 / sum_i m_l(i)``
(Sec. III-B), and :func:`seam_ratio` (gradient magnitude in a thin shell across the lung boundary,
sample over real).

Rooms: :mod:`.model` (layout, encodings, input checks, U-Net, schedule), :mod:`.train` (training view,
``LungDdpmTask``, ``train`` / ``ensure_trained``, run directories), :mod:`.sample` (``LungDDPM.sample`` with
AAS, ``load``, ``generate``, NIfTI output), :mod:`.evaluate` (metrics, the ablation table), :mod:`.plots`
(figures), :mod:`.method` (the face for chapters 08-11), :mod:`.cli` (``lungsynth lung-ddpm``),
:mod:`.bench` (``lungsynth bench lung-ddpm``).
"""

from __future__ import annotations

from lungsynth.exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "model": ("ENCODINGS", "KIND", "LAYOUT_LABELS", "VARIANTS", "build_scheduler", "build_unet", "check_layout",
              "check_reference", "check_variant", "generation_mask", "layout_channels", "make_layout", "model_config",
              "n_layout_channels", "nodule_weights", "to_model_scale", "to_unit_scale", "voxel_mm", "precision",
              "BF16_CPU_FLAGS"),
    "train": ("RUN_NAMES", "LungDdpmTask", "default_run_dir", "ensure_trained", "is_trained", "make_trainer", "train",
              "training_dataset", "config_mismatch"),
    "sample": ("SAMPLERS", "LungDDPM", "generate", "load", "sample", "save_volumes"),
    "evaluate": ("ABLATIONS", "boundary_shell", "eval_volumes", "evaluate", "gradient_magnitude", "lung_crops",
                 "metrics", "quality_gates", "seam_ratio", "volume_measures"),
    "plots": ("figure_consecutive_slices", "figure_side_by_side"),
    "cli": ("register",),
    "bench": ("bench_lung_ddpm",),
})
