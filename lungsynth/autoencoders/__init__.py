"""The course's autoencoders (chapter 02): what the latent-diffusion chapters diffuse in.

Four kinds, all x4 spatial compression, all built from MONAI networks:

| kind      | network (MONAI)          | input                      | latent                     | used by |
|-----------|--------------------------|----------------------------|----------------------------|---------|
| ``vae3d``   | AutoencoderKL, 3 levels, 1 res block each, no attention (MAISI-like, as in LAND) | CT [1,S,S,S] in [0,1] | [4,S/4,S/4,S/4] | 03 LAND, 05 HR-LDM |
| ``vqvae2d`` | VQVAE, two stride-2 levels, EMA codebook | slice [1,H,W] in [0,1] | [4,H/4,W/4] (quantised) | 04 bbox LDM |
| ``vae2d``   | AutoencoderKL 2D, 3 levels | nodule ROI [1,R,R] in [0,1] | [4,R/4,R/4] | 07 text-to-image |
| ``maskvae`` | AutoencoderKL 3D (small) | LAND condition mask [1,S,S,S] in [0,1] | [c,S/4,S/4,S/4] | 03 LAND-LatentMask |

What later chapters call::

    ae = ensure_autoencoder("vae3d", cfg)          # trains into runs/<profile>/02_vae3d when missing
    z = ae.encode_latent(x)                        # [B,1,S,S,S] -> [B,4,S/4,S/4,S/4], times ae.scale_factor
    x_hat = ae.decode_latent(z)                    # back to [B,1,S,S,S] (sliding window when large)
    ds = LatentDataset(cfg, "vae3d", "train", keys=("cond",))   # cached posteriors, z sampled per load

``ae.encode(x) -> (mean, std)`` and ``ae.decode(z)`` are the raw (unscaled) maps;
``ae.latent_shape(spatial)`` gives the latent shape of an input size. Checkpoints are the
engine's (``final.pt``); their ``config`` holds the architecture and the latent scale factor.

Rooms: :mod:`.model` (networks, spec, load), :mod:`.train` (training views, the engine task,
``train_autoencoder`` / ``ensure_autoencoder``, scale factor), :mod:`.latents` (latent caches),
:mod:`.evaluate` (reconstruction metrics, the resampling baseline, figures), :mod:`.cli`
(``lungsynth autoencoder``), :mod:`.bench` (``lungsynth bench vae``).
"""

from __future__ import annotations

from lungsynth.exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "model": ("KINDS", "DOWNSAMPLE", "TEXTURES", "LUNG_COND", "TRAINING_VIEWS", "Autoencoder", "autoencoder_spec",
              "build_autoencoder", "load_autoencoder", "check_kind", "codebook_stats", "default_run_dir"),
    "train": ("AutoencoderTask", "ImageView", "MixedDataset", "compute_scale_factor", "ensure_autoencoder", "item_id",
              "source_dataset", "source_key", "train_autoencoder", "train_budget", "trained_autoencoder"),
    "latents": ("LatentDataset", "encode_dataset", "ensure_latents"),
    "evaluate": ("body_mask", "evaluate_autoencoder", "mask_metrics", "nodule_errors", "plot_reconstructions",
                 "reconstruction_metrics", "resample_baseline", "texture_map"),
})
