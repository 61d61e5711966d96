"""Typed configuration: one dataclass section per chapter, three profiles.

A profile picks the sizes and budgets of every chapter at once:

- ``smoke``  : tests, CI and a first look (the whole course in minutes on 2 CPU cores);
- ``course`` : learning on a laptop or one GPU;
- ``full``   : the papers' settings, for a GPU.

Fields declared with :func:`tiered` take one value per profile; plain fields are the
same everywhere. Any field can be overridden with a dotted key, from a notebook's
papermill parameters or the command line::

    cfg = get_config("smoke", {"land.train_steps": 50, "seed": 1})
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

PROFILES: tuple[str, ...] = ("smoke", "course", "full")
DEFAULT_PROFILE = "smoke"
PROFILE_ENV = "LUNGSYNTH_PROFILE"


def tiered(smoke: Any, course: Any = None, full: Any = None) -> Any:
    """A field whose default depends on the profile (course defaults to smoke, full to course)."""
    course = smoke if course is None else course
    full = course if full is None else full
    return field(default=None, metadata={"tiers": {"smoke": smoke, "course": course, "full": full}})


# --------------------------------------------------------------------------- chapters


@dataclass
class DataConfig:
    """Chapter 01: LIDC-IDRI preparation and the phantom default."""

    # scans rendered/prepared (full: every scan with DICOM); course: 100 scans = 30 held-out test volumes
    # (about 5 s per scan to render and prepare; measured 2026-12-07 on 2 AMD EPYC cores: 532 s one scan after
    # another, 244 s in two data workers, with the 1824 arrays and the manifest byte-identical)
    n_scans: int = tiered(12, 100, 1018)
    phantom_seed: int = 0
    phantom_noise_hu: float = 20.0  # std of CT noise in the phantom
    phantom_render_matrix: int = tiered(128, 256, 256)  # in-plane matrix the phantom anatomy is drawn on
    spacing_3d_mm: float = tiered(4.0, 2.0, 1.0)  # isotropic spacing of the 3D views
    size_3d: int = tiered(64, 128, 256)  # cube side of the 3D volumes (LAND, HR-LDM)
    # cube side of Lung-DDPM volumes (the 3D view's field of view resampled): the course's 96 puts 256 mm at
    # 2.7 mm, so a 6 mm nodule is 2.25 voxels across (chapter 01's visibility gate); 64 left it at 1.5
    size_ddpm: int = tiered(32, 96, 128)
    # side of chapter 04's whole axial slices (the paper resizes them to 256); a pixel is the field of view / this
    # (the course's median 512 x 0.66 mm at 160: 2.1 mm). Course: 160 puts the widest course field of view
    # (512 x 0.877 = 449 mm) at 2.8 mm, a 6 mm nodule 2.1 pixels across (chapter 01's gate; 128 left it at 1.7)
    size_2d: int = tiered(64, 160, 256)
    roi_size: int = tiered(32, 64, 512)  # nodule ROI side (chapter 07)
    crop_size: int = tiered(32, 48, 90)  # nodule-centred 3D crops, voxels at 1 mm (chapters 05, 11)
    hu_min: float = -1000.0
    hu_max: float = 400.0
    # train / val / test, by patient; smoke keeps 2 test scans of 12 so test-set metrics have a spread; the
    # course holds out 30 of its 100 scans, the least the quality gates judge a distribution on
    split_fractions: tuple[float, float, float] = tiered((0.6, 0.2, 0.2), (0.6, 0.1, 0.3), (0.7, 0.2, 0.1))
    split_seed: int = 0


@dataclass
class EngineConfig:
    """Shared training-loop defaults (chapter 02 onward)."""

    mixed_precision: bool = True  # autocast the training steps (False: fp32 everywhere)
    # auto | bf16 | fp32: auto is bf16 on CUDA and on CPUs with AMX (3D steps 1.8-3x faster there), fp32 elsewhere
    # (runtime.FAST_BF16_CPU_FLAGS says why, measured); "auto" defers to $LUNGSYNTH_PRECISION
    precision: str = "auto"
    grad_clip: float = 1.0
    grad_accum: int = 1
    checkpoint_every: int = tiered(25, 500, 5000)
    log_every: int = tiered(5, 20, 100)
    # DataLoader workers. Course: 0, since on 2 cores a worker takes a core from the step it feeds (vae3d, bf16:
    # 0.22 s a step with 2 workers, 0.17 s in-process, measured); the prepared items are cached in memory after
    # their first read either way
    num_workers: int = tiered(0, 0, 8)


@dataclass
class AutoencoderConfig:
    """Chapter 02: 3D KL-VAE, 2D VQ-VAE, 2D KL-VAE and the mask VAE."""

    # course budget, chapter 02 (2 AMX cores, bf16): vae3d ~7 min, mask VAE ~3, VQ-VAE ~4.5, 2D KL-VAE ~3,
    # evaluation and gates ~5. Measured steps: vae3d (16,32,32) on 32^3 cubes, batch 4, 0.17 s (bf16); on
    # 48^3 cubes, batch 2, 0.30 s (bf16) and ~1.1 s (fp32, AVX2); at (32,64,64) on 64^3, batch 4, with the
    # perceptual term 24 s (fp32).
    vae3d_channels: tuple[int, ...] = tiered((8, 16, 16), (16, 32, 32), (64, 128, 256))
    vae2d_channels: tuple[int, ...] = tiered((16, 32, 32), (16, 32, 32), (64, 128, 256))
    latent_channels: int = 4
    # the 3D KL-VAE (smoke: ~40 s on 2 free CPU cores). Course, body MAE on the 30 test volumes against the x4
    # resampling baseline's 61.9 HU (the gate: 0.6x, 37.2 HU), all measured on the course data in bf16:
    # before the KL term was divided by the voxel count (train.AutoencoderTask), 62.4 HU at 550 steps and 61.2
    # at 750 (48^3 cubes, batch 2); with it, 56.7 at 750 and 40.4 at 2000 steps (48^3, batch 2), 40.1 with
    # cubes centred on a drawn nodule, 44.8 at (16,32,64), and 33.4 at 2000 steps of 32^3 cubes in batches
    # of 4 (0.54x, the course's setting: more places per step at 60% of the step's cost)
    train_steps: int = tiered(200, 2000, 100_000)
    # the mask VAE. Course, nodule Dice on the 30 test volumes (gate 0.5): 0.34 at 400 steps (48^3, batch 2),
    # 0.35 with the KL per voxel, 0.36 with cubes centred on a drawn nodule, 0.63 at 1500 steps (48^3, batch
    # 2); 0.58 at 1000 steps of 32^3 in batches of 4; 1200 adds a margin. Below ~1000 steps it keeps no
    # nodule under ~50 voxels (4.5 mm) at all
    train_steps_mask: int = tiered(200, 1200, 100_000)
    batch_size: int = tiered(2, 4, 2)  # 3D kinds; >= 2 also takes torch's faster CPU conv3d path
    lr: float = tiered(2e-3, 2e-3, 1e-4)  # smoke and course: a few hundred steps, so a high peak lr
    lr_schedule: str = tiered("cosine", "cosine", "constant")  # engine schedule (constant | cosine | polynomial)
    kl_weight: float = 1e-6  # per voxel of the input, as latent diffusion weighs it (train.AutoencoderTask)
    perceptual_weight: float = 0.3
    # off | astra | a MONAI PerceptualLoss network. Course: off, the I3ResNet-152 forward and backward made a
    # vae3d step 6x slower on 2 cores (24.3 s against 4.1 s), and the chapter's gates judge L1 errors
    perceptual_network: str = tiered("off", "off", "astra")
    adv_weight: float = tiered(0.01, 0.0, 0.01)  # course: no discriminator (CPU budget; the gates judge MAE)
    adv_warmup_steps: int = tiered(120, 500, 10_000)
    vq_num_embeddings: int = tiered(64, 256, 512)
    vq_embedding_dim: int = 4
    vq_commitment_cost: float = 0.25
    vq_decay: float = tiered(0.5, 0.9, 0.99)  # EMA codebook decay (fast adaptation in short runs)
    vqvae2d_channels: tuple[int, ...] = tiered((32, 64), (32, 64), (128, 256))  # two stride-2 levels: x4
    maskvae_channels: tuple[int, ...] = tiered((8, 16, 16), (8, 16, 16), (32, 64, 64))
    mask_latent_channels: int = 4
    maskvae_nodule_weight: float = 10.0  # L1 weight of nodule voxels: they are ~0.1% of a mask and vanish otherwise
    # L1 weight of the vae3d's nodule voxels (label > 0); 1 is the LAND poster's plain MAE. Measured on the
    # course data (2000 steps, fp32): weight 10 lowers the nodule MAE by texture 1..5 from 59/132/211/284/325
    # to 36/109/188/270/305 HU, but chapter 03's ceiling row stays at 9 of 16 nodules >= 6 mm keeping half
    # their contrast (the same 9; the lost ones are under one 8 mm latent voxel) and the body MAE rises from
    # 33.7 to 36.2 HU (gate 37.2). So the course keeps 1: the option costs a retrain of the vae3d and LAND
    # and moves no gate
    vae3d_nodule_weight: float = tiered(1.0, 1.0, 1.0)
    # weight of the mask VAE's soft nodule Dice loss (0: L1 + KL only). Measured on the course data (400 steps,
    # 30 test volumes; x4 resampling 0.30): nodule Dice 0.21 without it (val L1 0.0185), 0.34 with it (val L1
    # 0.0113); a ramp from the lung value itself gave 0.47 but pushed the lung below 0.1 (val L1 0.0235)
    maskvae_dice_weight: float = 1.0
    # 3D autoencoders train on random cubes (fully convolutional); course: 32, see train_steps
    patch_3d: int = tiered(32, 32, 128)
    foreground_crop_prob: float = 0.5  # share of 3D training cubes centred on a nodule voxel
    # share of vae3d training items that are 1 mm nodule crops (HR-LDM encodes those); the full
    # profile's volumes are at 1 mm already
    vae3d_crop_share: float = tiered(0.5, 0.3, 0.0)
    # course: 2500 steps, what the 2D gates need (measured, course data, 2 cores, fp32): at 500 steps the
    # VQ-VAE was at 0.88x its x4 baseline with 12% of its codes in use and the 2D KL-VAE at 1.32x; at 2000 the
    # VQ-VAE passes both gates (0.57x, perplexity 35% of K; 12.2 min at 0.37 s/step) and the KL-VAE is at
    # 0.608x against the gate's 0.6x (7.1 min at 0.21 s/step); 2500 adds the margin (about 24 min for both).
    # Smoke: 400 (each ~50 s on 2 cores), a quick look: at 700 the two took 191 s of chapter 02's 296 s of
    # training, and in those runs the train L1 at step 400 was 1.2x (KL-VAE) and 1.3x (VQ-VAE) its value at 700
    train_steps_2d: int = tiered(400, 2500, 100_000)
    batch_size_2d: int = tiered(16, 16, 32)  # 2D KL-VAE (nodule ROIs)
    vq_batch_size: int = tiered(8, 16, 32)  # 2D VQ-VAE (64^2 slices in smoke)
    disc_channels: int = tiered(16, 32, 64)
    disc_layers: int = 3
    # steps between validations. Course: 400, since one vae3d validation (sliding-window reconstructions of the
    # val volumes) costs ~27 s on 2 cores and every 200 steps they took 4.5 of its 12 minutes
    val_every: int = tiered(50, 400, 2500)
    sliding_roi: int = tiered(64, 128, 128)  # window (image voxels) of sliding encode/decode; larger inputs only
    sliding_overlap: float = 0.25
    scale_factor_items: int = 16  # training items encoded to estimate the latent scale factor


@dataclass
class LandConfig:
    """Chapter 03: LAND, 3D latent diffusion with anatomical masks."""

    # course budget, chapter 03: five variants (the poster's three, none, nodule-only) x 1000 steps of ~0.19 s
    # (latent 4x32^3, 2 cores, bf16 on AMX; ~0.2 s in fp32 on an AMD EPYC without AMX; the paper's widths
    # (64, 64, 128, 128, 256) with 2 res blocks cost 3.6 s in fp32), ~16 min of training, 4 volumes each for Table 1 and 8 for the gates (~7 min). Measured:
    # at 150 steps the samples had no lung where the mask had one (lung HU -382..-670 against the real -808);
    # at 1200 steps (latentmask, 223 s) the lungs follow the mask and their mean HU is -809..-821 (real -814),
    # while the body outline and the nodules are still missing (that was the earlier, blurred latent). With the
    # per-voxel KL latent, uniform weighting and lr 2e-4 (below), 1000 steps of 0.22 s: lung Dice 0.96-0.97 (mask,
    # latentmask), lung HU within 0.2 HU, no nodule yet at half its real contrast, KID 0.19-0.22x the noise
    # baseline (0.55-0.62x before that baseline shuffled the lungs too)
    unet_channels: tuple[int, ...] = tiered((16, 16, 32, 32, 32), (32, 32, 64, 64, 128), (64, 128, 256, 384, 512))
    num_res_blocks: int = tiered(2, 1, 2)
    attention_levels: tuple[bool, ...] = (False, False, True, True, True)  # cross-attention at the 3 deepest levels
    num_head_channels: int = 32
    skip: str = "additive"  # additive | concat
    context_dim: int = tiered(32, 64, 256)  # width of the mask tokens (cross-attention)
    token_grid: int = tiered(4, 4, 8)  # grid^3 mask tokens
    token_hidden: int = tiered(16, 32, 64)
    num_train_timesteps: int = 1000
    schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    min_snr_gamma: float = 5.0
    # "min-snr" (the poster: gamma(SNR_t) = min(SNR_t, gamma) / (SNR_t + 1) on the v loss) or "uniform" (plain v
    # MSE, as SD 2 trains). Smoke and course depart: the Min-SNR weight is ~SNR_t at high noise (0.007 at t = 700),
    # so in 1000 steps the steps that lay out the anatomy stay untrained. Measured (mask, lr 2e-4, 1000 steps, one
    # held-out latent): the x0 error relative to predicting zero at t = 700 / 900 was 0.95 / 1.51 with Min-SNR
    # (samples: textures) and 0.22 / 0.25 uniform (samples: chests whose lungs follow the mask)
    loss_weighting: str = tiered("uniform", "uniform", "min-snr")
    train_steps: int = tiered(30, 1000, 200_000)
    batch_size: int = 1
    # course: 2e-4. At 1e-3 every variant, none included, sat at a loss/weight of 0.81-0.84 after 1000 steps (the
    # relative v error of predicting zero is 1) and sampled textures; at 2e-4 the mask variant reached 0.25 in the
    # same 1000 steps (177 s), with lung-dark regions at -762 HU (real -811)
    lr: float = tiered(1e-3, 2e-4, 1e-5)
    sampler: str = "ddim"  # default sampler of sample(): ddim | ddpm
    ddim_steps: int = tiered(10, 20, 200)
    ddpm_steps: int = tiered(20, 100, 1000)  # DDPM reverse steps (< T respaces the betas; T = the paper's 1000)
    n_eval_samples: int = tiered(3, 4, 100)  # generated volumes per variant for Table 1
    # generated volumes per variant for the quality gates (methods/land/evaluate.py): the first n conditions of
    # one held-out half, the other half the KID reference, so the held-out set needs 2n volumes. Course: 8, the
    # gates' minimum (12 cost ~4 more minutes of sampling and I3ResNet features, ~3 s a volume on 2 cores).
    # Smoke (4 held-out) gets 2, below the gates' 8, so its report says "insufficient N".
    n_gate_samples: int = tiered(2, 8, 50)
    # volumes per reverse pass and decode when sampling and evaluating: memory is one chunk's, whatever the
    # count (full: one 256^3 volume at a time, the poster's 7.4 GB; a batch of 100 needed about 100x that)
    eval_batch: int = tiered(2, 2, 1)


@dataclass
class BboxLdmConfig:
    """Chapter 04: 2D LDM with a nodule box mask and LIDC attributes (Mari et al.)."""

    # course budget, chapter 04: the three configurations, configuration 2 with pooled mask tokens and the
    # lung-conditioned variant x 800 steps (batch 16, latent 40^2): 9-11.5 min a run on 2 AMD EPYC cores in fp32
    # (measured 2026-12-05 with pooled tokens; ~53 min for five), then the gates (48 slices per run and sampler,
    # 3.7 min for four). The chapter's largest cost; the issue-16 budget needs it cut. Measured on the earlier
    # 128^2 nodule-centred windows (config 2, v, cosine): 300 steps gave blobs, 800 lungs with vessels and chest
    # wall (as 1500 at a constant rate); on whole slices only the lung-conditioned run passes the whole-slice KID
    unet_channels: tuple[int, ...] = tiered((32, 64, 64), (32, 64, 64), (128, 256, 512))
    num_train_timesteps: int = 1000
    # what the U-Net regresses: "epsilon" (Mari et al. §2.2, ||eps - eps_hat||^2) or "v_prediction". Smoke and
    # course depart: after 800 CPU steps (course, config 2, cosine lr) the epsilon model's one-step estimate of z_0
    # was 26x (t = 900) and 1.5x (t = 700) worse than the latents' mean and it sampled textures; with v, 0.96x and
    # 0.57x, and lungs (lungsynth.diffusion.diagnostics; chapter 04)
    prediction: str = tiered("v_prediction", "v_prediction", "epsilon")
    attr_dim: int = 10  # D, one learnable table per attribute
    attr_hidden: int = 128
    attr_out_dim: int = 10  # D'
    train_steps: int = tiered(80, 800, 150_000)
    batch_size: int = tiered(8, 16, 16)
    lr: float = tiered(1e-3, 1e-3, 1e-4)  # smoke, course: a high rate so a few hundred steps show anatomy
    # engine schedule (constant | cosine | polynomial). Course: cosine, whose 800 steps matched 1500 at a constant rate
    lr_schedule: str = tiered("cosine", "cosine", "constant")
    ddim_steps: int = tiered(20, 25, 1000)
    hu_clip: tuple[float, float] = (-1000.0, 2500.0)
    # how configs 2 and 3 put the box mask into cross-attention: "flat", the paper's one flattened vector (Mari
    # §2.2: "by flattening and concatenating the vectors"), or "pooled", mask_grid^2 tokens with learned positions
    # (the course's earlier form, a named option; chapter 04 trains configuration 2 both ways)
    mask_context: str = "flat"
    mask_grid: int = 4  # "pooled": the mask becomes mask_grid^2 cross-attention tokens
    # a local folder holding a diffusers VQModel (save_pretrained: config.json + safetensors), frozen, as the paper
    # uses the diffusers VQ-VAE; "" (every profile: no pretrained weights are reachable offline) uses chapter 02's
    pretrained_vq: str = ""
    # generated slices per configuration and sampler for the quality gates (evaluate.quality_gates): half of the
    # held-out slices is the KID reference, the baselines take n of the other half. Course: 48 of the 124
    # held-out slices' 62 (a configuration's gates cost ~1 min of sampling); smoke's 8 are below the gates' 16
    n_gate_samples: int = tiered(8, 48, 100)
    # generated slices per configuration in Table 2 (evaluate): 0 = one per real slice of the split (smoke, course:
    # 33 validation slices, as the CPU budget allows); full: the paper's 2048 (Mari, Table 2), sampled in batches
    table2_samples: int = tiered(0, 0, 2048)


@dataclass
class HrLdmConfig:
    """Chapter 05: HR-LDM, histogram-regularised latent inpainting."""

    # course budget, chapter 05: HR-LDM and its no-histogram ablation, 1200 steps each (batch 4 of 12^3 latents),
    # 8 nodules per subtype evaluated. Measured 2026-12-07 on 2 AMD EPYC cores in fp32, alone on the machine:
    # 0.48 s a step with the histogram term (the truncated decoder), 0.31 without, 17 minutes for both runs with
    # their latent caches, and 1.3 minutes of gates (an earlier 0.59 / 0.43 s was measured beside other work)
    unet_channels: tuple[int, ...] = tiered((16, 32, 32), (32, 64, 64), (128, 256, 512))
    num_train_timesteps: int = 1000
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    hist_bins: int = 40
    hist_range_hu: tuple[float, float] = (-1000.0, 400.0)
    hist_weight: float = 10.0
    # what the U-Net regresses under eq. 5's masked L1: "epsilon" (the paper's) or "v_prediction". Smoke and
    # course: v. Measured (course, 1200 steps, held-out nodules in their healthy twins): with epsilon the z0
    # estimate at t >= 800 is off by 2-7 (latent std ~1), 25 DDIM steps drew solid nodules at -710 HU (real -90),
    # -271 unclipped; with v the estimate stays within 0.43 at every t and every sampler gave -390
    prediction: str = tiered("v_prediction", "v_prediction", "epsilon")
    # the latents outside the lesion M in training: "scan" (the paper's: the scan's own) or "twin" (phantom data:
    # the healthy twin's, the background synthesis inpaints into). Smoke and course: twin. Measured (course, v,
    # 1200 steps): trained on the scan's latents, whose neighbours of M still carry the nodule, the model read it
    # there (one-step z0 estimates at t = 50: part-solid -482 HU beside the real context, -687 beside the healthy
    # one) and drew part-solid nodules at -781 into healthy twins; trained on the twin's, -684 (solid -390 -> -226)
    train_context: str = tiered("twin", "twin", "scan")
    # eq. 5 with each latent voxel weighted 1 + (w - 1) x the nodule's share of it (1: eq. 5 as printed). Measured
    # once (course, v, twin, 1200 steps, the histogram run only): w = 20 drew solid / part-solid / ground-glass at
    # -124 / -621 / -727 HU (real -90 / -524 / -673; unweighted -226 / -684 / -739), JSD 0.071 / 0.157 / 0.233
    # against 0.134 / 0.214 / 0.231, the pasted ring 118 HU against 97. Smoke and course: 20; full: eq. 5 as printed
    nodule_weight: float = tiered(20.0, 20.0, 1.0)
    # "none" is the paper's eq. 8; "alpha_bar" weights the histogram term by alpha_bar_t, without which
    # eps is not learned in short runs (hr_ldm_losses explains why); full keeps the paper's form. With the v
    # target that reason goes, and "none" was measured again (course, v, twin, 1200 steps, 8 nodules a subtype):
    # JSD to real solid / part-solid / ground-glass 0.157 / 0.225 / 0.339 against 0.134 / 0.214 / 0.231 with alpha_bar
    hist_timestep_weighting: str = tiered("alpha_bar", "alpha_bar", "none")
    # course: 1200 steps. With the earlier recipe (epsilon, scan context) 250 steps stopped at an eq. 5 loss of 1.3,
    # still falling (0.8 at 1200); chapter 05 has the gates at 250 and at 1200
    train_steps: int = tiered(200, 1200, 100_000)
    batch_size: int = tiered(2, 4, 1)  # full: the paper's batch of 1
    lr: float = tiered(1e-3, 1e-3, 1e-5)  # full: the paper's 1e-5 (Adam, polynomial decay)
    ddim_steps: int = tiered(10, 25, 1000)
    sampler: str = tiered("ddim", "ddim", "ddpm")  # ddpm with ddim_steps=1000 is the paper's Algorithm 2
    num_res_blocks: int = tiered(1, 2, 2)
    attention_levels: tuple[bool, ...] = tiered((False, False, True), (False, True, True), (False, False, True))
    context_dim: int = tiered(32, 64, 256)  # width of the histogram token for cross-attention
    hist_hidden: int = tiered(64, 128, 256)  # MLP (SiLU) hidden width of the histogram encoder
    hist_layers: int = 1  # hidden layers of that MLP: eq. 3 has one; more is a named option
    lr_power: float = 1.0  # polynomial LR decay power
    # Algorithm 2 re-anchors the background to q(z_bg, t-1) (True); training noises only the lesion
    # (eq. 3), so pasting z_bg clean (False) matches what the network saw: in the smoke run it halved
    # the decoded change outside the nodule. full keeps the paper's form.
    anchor_noise_background: bool = tiered(False, False, True)
    # clip each step's predicted z0 to [-c, c] (scaled latents have std ~1; 0 = off, the paper's form):
    # a short run's eps errors, amplified by 1/sqrt(alpha_bar_t), otherwise give latents far outside
    # the decoder's range, and the decoder smears them over the whole crop
    clip_latent: float = tiered(3.0, 3.0, 0.0)
    lung_erosion_mm: float = 4.0  # candidate centres keep this margin (plus the nodule radius) to the pleura
    # share of inpainted nodules placed sub-pleurally, centred in the rim the erosion leaves (Sec. 3.3 models
    # them without giving a share; a quarter is this course's choice)
    subpleural_share: float = 0.25
    size_range_mm: tuple[float, float] = (6.0, 30.0)  # the nodule library's diameters (the paper's Sec. 4)
    n_cache: int = tiered(48, 200, 0)  # training crops encoded once into the latent cache (0 = all)
    # held-out nodules regenerated per subtype in evaluate() and the gates (at most: a rarer subtype enters with
    # what it has, never repeated)
    eval_per_subtype: int = tiered(4, 8, 200)
    n_placement_trials: int = tiered(4, 8, 100)  # nodules inpainted into held-out scans for the placement gates


@dataclass
class LungDdpmConfig:
    """Chapter 06: Lung-DDPM, pixel-space 3D DDPM with anatomically aware sampling."""

    # Med-DDPM/Lung-DDPM U-Net at 128^3: 64 base channels, multipliers (1, 1, 2, 3, 4), attention at 16^3.
    # course budget, chapter 06 (~10 min of training on an AVX512-BF16 or AMX CPU): each variant 3000 steps on
    # lung-centred 32^3 cubes (train_patch) at widths (16, 32, 32, 64), 0.1 s a step in bf16 (a whole 96^3 volume
    # at (8, 16, 16, 32) cost 2.4 s a step in fp32); 25 respaced reverse steps on whole 96^3 volumes
    unet_channels: tuple[int, ...] = tiered((16, 32, 32), (16, 32, 32, 64), (64, 64, 128, 192, 256))
    attention_at: tuple[int, ...] = tiered((2,), (3,), (3,))  # U-Net levels with self-attention
    num_res_blocks: int = 1
    layout_encoding: str = "onehot"  # onehot (3 channels; 2 without the lung) | scaled (1 channel in [-1, 1])
    num_train_timesteps: int = 250
    schedule: str = "cosine"
    # what the U-Net regresses (L1, eq. 7): "epsilon" (the paper's) or "v_prediction" (Salimans & Ho 2022).
    # Smoke and course: v. With epsilon, x0 = (x_t - sqrt(1-ab) eps) / sqrt(ab) amplifies the error 160x at
    # t = T-1, so the first reverse steps set the lungs' mean level at random (clipped to [-1, 1]: mean 0) and
    # the short-trained model then reads that level from x_t: whole course volumes came out at lung mean 0.43-0.54
    # against the real 0.15 ([0, 1]); anchoring only the lungs' mean for t > 200 gave 0.16. A v-model predicts
    # x0 directly where x_t holds no signal: lung mean 0.14 after the same 3000 steps (chapter 06)
    prediction: str = tiered("v_prediction", "v_prediction", "epsilon")
    # eq. (7): "l1" (the paper's) or "l2". Smoke and course: l2 with v. L1 regresses the median of the target, and
    # v holds x0, whose posterior in the lungs is skewed (rare bright vessels, nodules of unknown texture); the
    # sampler assumes the mean. Measured, course, 3000 steps, two runs each: with L1 no vessels and 6-11 of 28
    # nodules at half the real contrast, lung JSD 0.15-0.53; with L2 vessels, 9-14 nodules, JSD 0.10-0.25 (ch. 06)
    loss: str = tiered("l2", "l2", "l1")
    # a nodule voxel weighs 1 + nodule_weight lung voxels in the loss (eq. 7 weighs all alike: 0, the paper's).
    # Smoke and course: 20. A nodule is ~0.1% of a nodule-centred 32^3 cube; after 3000 unweighted steps the
    # one-step x0 at t = 240 drew nodules at 0.29x their real contrast (median), and 25-step samples kept 9-13 of
    # 28 nodules at half the real contrast; weighted 20 or 50: 21-26 of 28 (chapter 06)
    nodule_weight: float = tiered(20.0, 20.0, 0.0)
    ema_decay: float = 0.995
    ema_start: int = tiered(10, 20, 2000)
    ema_every: int = 10
    # sample with the EMA weights (the paper's) or the raw ones. Smoke and course: raw, since 0.995 every 10
    # steps averages over ~2000 steps, most of the course's 3000: with its EMA a course probe's lung JSD was
    # 0.43 against 0.15 raw (chapter 06)
    sample_ema: bool = tiered(False, False, True)
    # smoke: 20 steps of 2 whole 32^3 volumes (the 40 volumes of 40 steps of 1, in 25 s against 62 s): for a batch
    # of 1 at these widths torch's CPU conv3d takes its native path, not oneDNN (1.56 s a step for 1 volume,
    # 1.25 s for 2, measured in fp32 on 2 cores). Course and full keep the paper's batch of 1
    train_steps: int = tiered(20, 3000, 100_000)
    batch_size: int = tiered(2, 1, 1)
    # the reference trains with batch 1 and 2 accumulated micro-batches, in fp32, unclipped
    grad_accum: int = tiered(1, 1, 2)
    grad_clip: float = tiered(1.0, 1.0, 0.0)  # 0: off. Smoke and course: clipped, for their high learning rates
    # training and sampling precision; auto: the engine's setting, with bf16 on AVX512-BF16 CPUs as well as AMX
    # (lung_ddpm.model.BF16_CPU_FLAGS says why)
    precision: str = tiered("auto", "auto", "fp32")
    # side of the training cubes cut from the size_ddpm volumes (data.patches.LungCubes: half centred on a
    # nodule, half on a lung voxel); sampling runs on whole volumes, as the U-Net is fully convolutional.
    # 0: whole volumes, as the paper. Course: 32 (a 96^3 step is ~25x dearer)
    train_patch: int = tiered(0, 32, 0)
    lr: float = tiered(2e-4, 5e-4, 1e-5)
    # engine.SCHEDULES; the reference's is constant. Course, measured: cosine decay drew the lungs too dark
    # (mean 0.08-0.10 against 0.15-0.16) where constant gave 0.14-0.16
    lr_schedule: str = "constant"
    blend_from: int = 250  # AAS blends the reference from this step down to 0
    # the reverse process: "ddpm" (the paper's ancestral sampler) or "ddim" (the fast sampler, eta 0); AAS
    # anchors the reference at every step of either
    sampler: str = tiered("ddpm", "ddpm", "ddpm")
    sample_steps: int = tiered(10, 25, 250)  # reverse steps (the paper: all 250 of DDPM; fewer: respaced)
    # the U-Net denoises the volume in cubes of this side when > 0 (lungsynth.diffusion.tiling: a grid of
    # non-overlapping cubes shifted every step, its borders kept off the nodules; MONAI's overlapping window where
    # the sides are not multiples of the tile); 0: the whole volume at once, as the paper. Course: 48, as its model
    # was trained on 32^3 cubes: on whole 96^3 volumes the one-step x0 of the lungs was 20-50 HU too dark at
    # t = 80-150 where on 32^3 cubes it was within 9 HU, and the samples' lungs came out 30-70 HU off (lung JSD
    # 0.13-0.38); in 48^3 tiles within 4 HU. Measured on the chapter's gates (8 volumes, DDPM / DDIM): overlapping
    # windows (27 a step) JSD 0.029 / 0.026, 24 of 28 nodules with DDIM, 53 s a volume; the shifted grid (8 a step)
    # 0.041 / 0.033, 24 of 28, 15-17 s; the same grid with borders through nodules 20 of 28 (fails); overlapping
    # 56^3 windows (8 a step, 18 s) fail the DDPM JSD (0.093) (chapter 06)
    sample_tile: int = tiered(0, 48, 0)
    eval_split: str = tiered("val", "test", "test")
    n_eval: int = tiered(3, 3, 100)  # volumes sampled per ablation row


@dataclass
class Text2ImgConfig:
    """Chapter 07: text-to-image LDM of nodule ROIs (Urata et al.)."""

    unet_channels: tuple[int, ...] = tiered((32, 64, 64), (64, 128, 128), (320, 640, 1280, 1280))
    num_train_timesteps: int = 1000
    # what the course's own U-Net regresses (a local SD folder's scheduler says its own): epsilon as SD 1.x, or
    # v_prediction as SD 2.0 at 768 (the paper's SDv2, its best model). Smoke and course: v. Measured (course,
    # 400 steps, one seed each, test split at guidance 5): texture adherence 0.224 -> 0.485 (real ROIs 0.366),
    # calcification 0.582 -> 0.920 (real 0.892), nodules of the right size 38% -> 71% (real 81%), KID 0.0031 ->
    # -0.0001; full: SD 1.5's epsilon
    prediction_type: str = tiered("v_prediction", "v_prediction", "epsilon")
    # weight of the latent positions inside the ROI's centred disk of radius side / 4, where every ROI's nodule is
    # (model.nodule_disk_weight; 1 = SD's objective as printed). Measured (course, v, 400 steps, same seed, test split
    # at guidance 5): the prompts of texture 3-5 give a nodule of the right size in 93% of the ROIs (weight 1: 78%;
    # real 84%), the geometry gate 71% -> 81% (real 81%, gate 80%), the other gates still pass; seed 1: 68% -> 71%,
    # 3 -> 4 of 6 gate rows. Ground-glass prompts are drawn as holes at guidance 5 either way (chapter 07). Full: 1
    nodule_weight: float = tiered(5.0, 5.0, 1.0)
    prompt_dropout: float = 0.1
    guidance_scales: tuple[float, ...] = (5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0)
    # course budget, chapter 07: 400 steps (batch 16 of 16^2 latents) with four validations of 32 ROIs, 7.3-9.2
    # minutes (2026-12-07, 2 AMD EPYC cores, fp32), 300 classifier steps, 16 ROIs per guidance scale with 25 DDIM
    # steps. 800 steps (v) were measured too: every gate as at 400, the geometry gate no closer (67% against 71%)
    train_steps: int = tiered(150, 400, 20_000)
    batch_size: int = tiered(8, 16, 8)
    lr: float = tiered(1e-3, 1e-3, 1e-4)  # from scratch; fine-tuning uses pretrained_lr
    sample_steps: int = tiered(10, 25, 50)
    sampler: str = "ddim"  # ddim | pndm
    layers_per_block: int = tiered(1, 2, 2)
    attention_head_dim: int = 8
    pretrained_lr: float = 1e-6  # fine-tuning a local Stable Diffusion U-Net, as the paper
    n_eval_samples: int = tiered(8, 16, 500)  # generated ROIs per guidance scale
    # the paper's stopping rule (§2.3): validation KID every val_every steps (0: never), the lowest kept in best.pt;
    # val_samples ROIs for the validation prompts at the paper's best guidance scale
    val_every: int = tiered(50, 100, 1000)
    val_samples: int = tiered(8, 32, 416)
    val_guidance: float = 5.0
    classifier_steps: int = tiered(60, 300, 5000)  # attribute-recovery classifier on real ROIs


@dataclass
class SamplingConfig:
    """Chapter 08: sampling at scale into synthetic datasets."""

    n_samples: int = tiered(4, 8, 1000)  # course: ~1 min of LAND sampling (chapter 08)
    batch_size: int = tiered(2, 4, 8)


@dataclass
class EvalConfig:
    """Chapter 09: one evaluation for every method."""

    # the 3D feature network: "astra" (packaged), "astra-2.5d", or weights the user holds locally,
    # "medicalnet:/path/resnet_50_23dataset.pth" / "radimagenet:/path/ResNet50.pt" (eval.local_networks)
    feature_network: str = tiered("astra", "astra", "astra")
    bootstrap: int = tiered(20, 200, 1000)
    min_samples_warn: int = 50
    # synthetic samples per method for the leaderboard (heldout conditions), by unit: volumes (and crops), and 2D
    # slices/ROIs. Course: 32 volumes and 256 slices/ROIs so the board ranks (issue 22; the reference half is 15
    # test scans, 62 test slices); not yet timed in a whole course run (chapter 09 took 11.7 min at 15 volumes).
    # full: 0 = each method's paper's count (MethodFace.paper_samples: LAND 100, bbox 2048, HR-LDM 500,
    # text2img 500, Lung-DDPM one per held-out case)
    n_samples: int = tiered(6, 32, 0)
    n_samples_2d: int = tiered(6, 256, 0)
    slice_net_steps: int = tiered(60, 300, 2000)  # rotation-training steps of the 2D feature net (slice/ROI methods)
    # local folders of pretrained weights for the metrics no package ships (chapter 07, Urata et al. §2.4):
    # a transformers CLIP folder, LPIPS's alexnet.pth + alex.pth, a BiomedCLIP folder; "" = not available offline
    clip_dir: str = ""
    lpips_dir: str = ""
    biomedclip_dir: str = ""
    memorization_percentile: float = 5.0  # flag synthetic samples closer to train than this percentile of held-out
    dice_threshold_hu: float = -500.0  # generated-nodule threshold for Dice against the condition mask


@dataclass
class DownstreamConfig:
    """Chapters 10-11: segmentation and classification with synthetic data."""

    # synthetic count = ratio x real count; smoke runs a subset to stay within its time budget
    # course budget, measured on 2 cores in fp32: chapter 10 17 min (3 ratios x 2 runs per setting; the volume
    # setting 7.5 min, the crops 9.8), chapter 11 4.7 min (150-step classifiers). Since chapter 10 takes Lung-DDPM's
    # volumes from the validation layouts (2026-12-07, AMD EPYC): 84 volumes for the crops' 251 nodules at 31 s
    # each (43 min), then 2 seeds x 5 arms of 300 steps at 4-5 min a training: ~90 min for the chapter alone, the
    # course's whole goal; issue 16 has to choose what gives way
    synthetic_ratios: tuple[float, ...] = tiered((0.0, 0.5, 1.0), (0.0, 0.5, 1.0), (0.0, 0.25, 0.5, 0.75, 1.0))
    real_fractions: tuple[float, ...] = tiered((1.0, 0.2, 0.0), (1.0, 0.2, 0.0), (1.0, 0.5, 0.2, 0.1, 0.0))
    lr: float = tiered(1e-3, 1e-3, 1e-4)
    n_runs: int = tiered(2, 2, 5)
    eval_splits: tuple[str, ...] = tiered(("val", "test"), ("test",), ("test",))  # smoke: 2 test patients only
    allow_repeats: bool = tiered(True, False, False)  # a synthetic pool smaller than asked repeats items
    # where chapter 10's synthetic volumes take their lung and nodule layouts: "validation", the val split's
    # patients, whom neither the generator nor the segmenter trains on and who are not tested (Lung-DDPM's
    # validation cohort, Table I; their real volumes are the "+ real" arm of its Table III); smoke's val split is
    # an evaluation split (eval_splits), so smoke keeps the training layouts ("sampler") and has no "+ real" arm
    seg_condition_source: str = tiered("sampler", "validation", "validation")
    n_synthetic: int = tiered(4, 16, 1000)  # samples the chapters synthesize when no dataset is given
    seg_channels: tuple[int, ...] = tiered((8, 16, 32), (8, 16, 32, 64), (32, 64, 128, 256, 512))
    # course: 300 steps take the real-only crop Dice from 0.07 (150 steps) to 0.44 (LAND's 2 mm crops); at
    # Lung-DDPM's 2.7 mm (one seed, 2026-12-07) 0.29 at 300 steps, 0.37 at 600 (7.5 min a training; chapter 10);
    # the volume setting learns almost nothing in the course budget (Dice 0.01 after 600 patch steps, 5 minutes),
    # so it runs 150 as a demonstration of the pipeline
    seg_steps: int = tiered(10, 300, 20_000)
    # which settings chapter 10 runs. Course: crops only, since the volume setting learned nothing in its budget
    # (whole 96^3 volumes, 48^3 patches, 2 seeds x 3 ratios: Dice 0.003 after 150 steps, 7.5 of the chapter's 17
    # minutes; 0.012 after 600): at 96^3 a 6 mm nodule is about 2 voxels, as dim as the lung around it
    seg_settings: tuple[str, ...] = tiered(("volume", "crop"), ("crop",), ("volume", "crop"))
    seg_volume_steps: int = tiered(0, 150, 0)  # steps of the volume setting; 0: seg_steps
    seg_batch_size: int = tiered(1, 4, 2)
    seg_crop_size: int = tiered(24, 48, 96)  # nodule-centred segmentation crops at 1 mm (divisible by 2^levels)
    # the volume setting trains on random patches of this side cut from the whole volumes, half of them centred on
    # a nodule voxel, and predicts on whole volumes (0: trains on whole volumes, as the paper). Course: a batch of
    # four 96^3 volumes costs 6.4 s a step on 2 cores, of four 48^3 patches 0.29 s (measured).
    seg_volume_patch: int = tiered(0, 48, 0)
    cls_init_features: int = tiered(8, 16, 64)  # DenseNet121: 64 / 32 in the original
    cls_growth_rate: int = tiered(8, 8, 32)
    cls_blocks: tuple[int, ...] = (6, 12, 24, 16)  # DenseNet121's dense blocks
    # course, measured on the 6-30 mm nodules with every crop cut from the 2 mm volumes (real-only, 2 seeds): 48^3
    # crops at 150 steps reached macro AUROC 0.65 (seed 0), at 600 steps 0.78 / 0.73 (0.55 s a step); 32^3 crops
    # at 1200 steps 0.865 (seed 0), best validation at step 600, 0.25 s a step. A 30 mm nodule still fits 32 mm.
    cls_crop_size: int = tiered(32, 32, 90)  # the classifiers' nodule-centred crops at 1 mm (90: the paper's)
    cls_steps: int = tiered(10, 1200, 10_000)
    cls_batch_size: int = tiered(4, 8, 16)
    # early stopping (HR-LDM §5.3): this share of the real training patients is held out as a real-only
    # validation set; each classifier keeps the weights of its lowest validation cross-entropy, measured every
    # cls_val_every steps, and stops after cls_patience validations without a better one (0: runs all its steps)
    val_fraction: float = tiered(0.2, 0.2, 0.2)
    # five-fold cross-validation (HR-LDM §5.3, "for model selection"): run k validates on fold k of one partition
    # of the training patients (seed cfg.seed), so over five runs every patient validates once; off, each run draws
    # its own split (seed cfg.seed + k). Course keeps its own splits: 2 runs would see 2 of the 5 folds
    cls_cross_validation: bool = tiered(False, False, True)
    cls_val_every: int = tiered(5, 50, 250)
    cls_patience: int = tiered(0, 6, 10)
    scarcity_runs: int = tiered(1, 1, 5)
    # chapter 11 reads the 6-30 mm nodules only (HR-LDM Sec. 5.1), real and synthetic alike; () reads all sizes
    cls_size_range_mm: tuple[float, ...] = (6.0, 30.0)


# --------------------------------------------------------------------------- the whole


@dataclass
class Config:
    """Everything one profile needs; ``cfg.land.train_steps`` and so on."""

    profile: str = DEFAULT_PROFILE
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    autoencoders: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    land: LandConfig = field(default_factory=LandConfig)
    bbox_ldm: BboxLdmConfig = field(default_factory=BboxLdmConfig)
    hr_ldm: HrLdmConfig = field(default_factory=HrLdmConfig)
    lung_ddpm: LungDdpmConfig = field(default_factory=LungDdpmConfig)
    text2img: Text2ImgConfig = field(default_factory=Text2ImgConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_profile(profile: str | None = None) -> str:
    """``profile``, else ``$LUNGSYNTH_PROFILE``, else ``smoke``; an unknown name is an error."""
    name = profile or os.environ.get(PROFILE_ENV) or DEFAULT_PROFILE
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; valid profiles: {', '.join(PROFILES)}")
    return name


def _section(cls: type, profile: str) -> Any:
    values = {}
    for f in fields(cls):
        tiers = f.metadata.get("tiers")
        if tiers is not None:
            values[f.name] = tiers[profile]
    return cls(**values)


_PRECISIONS = ("auto", "bf16", "fp32")  # lungsynth.runtime.PRECISIONS
_LR_SCHEDULES = ("constant", "cosine", "polynomial")  # lungsynth.engine.SCHEDULES
_NOISE_SCHEDULES = ("linear", "scaled_linear", "cosine", "sigmoid")  # lungsynth.diffusion.schedules.SCHEDULES
_PREDICTIONS = ("epsilon", "eps", "noise", "v_prediction", "v", "velocity", "sample", "x0", "x_0")
#: the values each closed-set string setting accepts, so that an override the code cannot use fails when it is
#: applied, naming them (tests/test_config.py checks each against the constant of the code that reads it).
#: String settings not here take open names: MONAI network names, feature networks, folders.
CHOICES: dict[str, tuple[str, ...]] = {
    "engine.precision": _PRECISIONS, "lung_ddpm.precision": _PRECISIONS,
    "autoencoders.lr_schedule": _LR_SCHEDULES, "bbox_ldm.lr_schedule": _LR_SCHEDULES,
    "lung_ddpm.lr_schedule": _LR_SCHEDULES,
    "land.schedule": _NOISE_SCHEDULES, "lung_ddpm.schedule": _NOISE_SCHEDULES,
    "bbox_ldm.prediction": _PREDICTIONS, "lung_ddpm.prediction": _PREDICTIONS,
    "hr_ldm.prediction": _PREDICTIONS, "hr_ldm.train_context": ("twin", "scan"),
    "text2img.prediction_type": ("epsilon", "v_prediction"),
    "land.skip": ("additive", "concat"), "land.loss_weighting": ("min-snr", "uniform"),
    "land.sampler": ("ddim", "ddpm"), "hr_ldm.sampler": ("ddpm", "ddim"), "lung_ddpm.sampler": ("ddpm", "ddim"),
    "text2img.sampler": ("ddim", "pndm"),
    "bbox_ldm.mask_context": ("flat", "pooled"),
    "hr_ldm.hist_timestep_weighting": ("none", "alpha_bar"),
    "lung_ddpm.layout_encoding": ("onehot", "scaled"), "lung_ddpm.loss": ("l1", "l2", "mse", "huber"),
    "lung_ddpm.eval_split": ("val", "test"),
    "downstream.seg_condition_source": ("sampler", "validation"),
}


def _check_choice(key: str, value: Any) -> Any:
    allowed = CHOICES.get(key)
    if allowed is not None and value not in allowed:
        raise ValueError(f"override {key}={value!r}: not a value the code can use; allowed: {', '.join(allowed)}")
    return value


def _coerce(value: Any, current: Any, key: str) -> Any:
    """Cast an override to the type of the current value (papermill/CLI pass strings and lists)."""
    if current is None or value is None:
        return value
    if isinstance(current, bool):
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"override {key}={value!r}: expected a boolean")
        return bool(value)
    if isinstance(current, tuple):
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        items = list(value)
        kind = type(current[0]) if current else str
        return tuple(kind(v) if not isinstance(v, str) or kind is str else kind(v.strip()) for v in items)
    try:
        return type(current)(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"override {key}={value!r}: expected {type(current).__name__}") from exc


def apply_overrides(cfg: Config, overrides: Mapping[str, Any] | None) -> Config:
    """Set dotted keys (``"land.train_steps"``) on a copy of ``cfg``; unknown keys are errors."""
    cfg = dataclasses.replace(cfg, **{f.name: dataclasses.replace(getattr(cfg, f.name))
                                      for f in fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))})
    for key, value in (overrides or {}).items():
        parts = key.split(".")
        target: Any = cfg
        for part in parts[:-1]:
            if not dataclasses.is_dataclass(target) or not hasattr(target, part):
                raise KeyError(f"unknown config section {part!r} in override {key!r}; "
                               f"sections: {', '.join(f.name for f in fields(Config) if f.name not in ('profile', 'seed'))}")
            target = getattr(target, part)
        name = parts[-1]
        if not dataclasses.is_dataclass(target) or name not in {f.name for f in fields(target)} or name == "profile":
            valid = ", ".join(f.name for f in fields(target)) if dataclasses.is_dataclass(target) else ""
            raise KeyError(f"unknown config key {key!r}; valid keys here: {valid}")
        setattr(target, name, _check_choice(key, _coerce(value, getattr(target, name), key)))
    return cfg


def get_config(profile: str | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """The configuration of ``profile`` (default ``$LUNGSYNTH_PROFILE`` or smoke) with overrides."""
    name = resolve_profile(profile)
    sections = {f.name: _section(f.default_factory, name)  # type: ignore[misc]
                for f in fields(Config) if f.default_factory is not dataclasses.MISSING}
    cfg = Config(profile=name, **sections)
    return apply_overrides(cfg, overrides)


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """``["land.train_steps=10", ...]`` from the command line into a dict."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def profile_table(keys: tuple[str, ...] = ("data.size_3d", "data.spacing_3d_mm", "data.size_ddpm", "data.size_2d",
                                            "data.n_scans", "autoencoders.train_steps", "land.train_steps",
                                            "land.ddim_steps", "lung_ddpm.train_steps"),
                  overrides: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Rows ``{"setting": key, "smoke": v, "course": v, "full": v}`` to compare the profiles, each with
    ``overrides`` applied (a notebook's ``OVERRIDES``)."""
    configs = {name: get_config(name, overrides) for name in PROFILES}
    rows = []
    for key in keys:
        row: dict[str, Any] = {"setting": key}
        for name, cfg in configs.items():
            value: Any = cfg
            for part in key.split("."):
                value = getattr(value, part)
            row[name] = value
        rows.append(row)
    return rows


def add_profile_argument(parser: argparse.ArgumentParser) -> None:
    """``--profile`` and ``--set key=value`` overrides, shared by every subcommand."""
    parser.add_argument("--profile", default=None,
                        help="smoke | course | full (default: $LUNGSYNTH_PROFILE or smoke)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set land.train_steps=10 (repeatable)")
