import sys
sys.path.insert(0, "tools")
from nb import build

build([
("md", r"""
# 02 — One training engine, and the autoencoders latent diffusion stands on

Four of the five methods diffuse in the latent space of an autoencoder rather than in voxels: a
64x smaller grid in 3D makes each denoiser step cheap enough for 256^3 CT on one GPU. This chapter
trains the four autoencoders of the course through **the one training loop** every model uses
(`lungsynth.engine.Trainer`), and measures what compression costs, especially on small nodules.

**What you will learn**
- what the engine gives every model: AdamW and LR schedules, bf16 on CUDA, EMA, gradient
  accumulation, atomic checkpoints with exact resume, DDP under torchrun, a metrics log;
- the KL-VAE objective (L1 + perceptual + patch adversarial + KL) and the VQ-VAE's codebook;
- the latent scale factor and why latents are cached as mean and std, not as one sample;
- how much a x4 autoencoder loses against plain down-and-up sampling, per region and nodule size.

**Needs:** chapter 01 (the prepared data; built here when missing).
"""),
("params", r"""
PROFILE = None  # None: $LUNGSYNTH_PROFILE or "smoke"
OVERRIDES = {}  # e.g. {"autoencoders.train_steps": 500}
"""),
("md", r"""
## Setup
"""),
("code", r"""
import json
import math
import time

import matplotlib.pyplot as plt
import pandas as pd
import torch
from IPython.display import display

from lungsynth.config import get_config
from lungsynth.data.datasets import ensure_prepared
from lungsynth.engine import plot_metrics
from lungsynth.nn.ae_eval import (codebook_stats, evaluate_autoencoder, nodule_errors, plot_reconstructions,
                                  resample_baseline)
from lungsynth.nn.ae_training import source_dataset
from lungsynth.nn.autoencoders import LatentDataset, build_autoencoder, default_run_dir, ensure_autoencoder

cfg = get_config(PROFILE, OVERRIDES)
ensure_prepared(cfg, verbose=False)
print(f"profile {cfg.profile}: 3D volumes {cfg.data.size_3d}^3, training cubes {cfg.autoencoders.patch_3d}^3")
"""),
("md", r"""
## Why latent diffusion

A denoiser runs hundreds of times per sample, and in 3D its cost grows with the number of voxels.
Encoding first shrinks each side by 4: a 256^3 CT becomes a 4x64^3 latent, 16x fewer numbers and
64x fewer positions for the U-Net's convolutions and attention. The autoencoder is trained once,
frozen, and every diffusion step happens in its latent space; only the final sample is decoded.
The price is whatever the autoencoder cannot reconstruct. The four autoencoders of the course:
"""),
("code", r"""
kinds = ("vae3d", "maskvae", "vqvae2d", "vae2d")
sizes = {"vae3d": cfg.data.size_3d, "maskvae": cfg.data.size_3d, "vqvae2d": cfg.data.size_2d, "vae2d": cfg.data.roi_size}
rows = []
for kind in kinds:
    ae = build_autoencoder(kind, cfg)
    shape = ae.latent_shape(sizes[kind])
    n_in, n_lat = sizes[kind] ** ae.spatial_dims, math.prod(shape)
    rows.append({"kind": kind, "input side": sizes[kind], "latent": "x".join(map(str, shape)),
                 "values kept": f"1/{n_in / n_lat:g}", "parameters": sum(p.numel() for p in ae.parameters())})
pd.DataFrame(rows).set_index("kind")
"""),
("md", r"""
## The objective

The 3D KL-VAE (MAISI-like, as in LAND: 3 levels, one residual block per level, x4, 4 latent
channels) maps a CT volume $x$ to a Gaussian posterior $q(z|x)=\mathcal N(\mu,\sigma^2)$ and decodes
$\hat x = D(z)$. It minimises

$$\mathcal L = \lVert x-\hat x\rVert_1 + \lambda_p\,\mathcal L_{perc}(x,\hat x)
+ \lambda_{adv}\,\mathcal L_{adv}(\hat x) + \beta\,\mathrm{KL}\big(q(z|x)\,\Vert\,\mathcal N(0,I)\big),$$

with a MONAI `PatchDiscriminator` trained by the engine's second optimiser after a warm-up. The
perceptual term uses the packaged I3ResNet chest-CT encoder's features (MONAI's perceptual networks
need weights that cannot be downloaded here); the smoke profile turns it off for speed. The 2D
VQ-VAE replaces the Gaussian by the nearest of $K$ codebook vectors (EMA updates), the 2D KL-VAE
serves chapter 07's ROIs, and the mask VAE compresses LAND's condition masks.

`ensure_autoencoder` trains each one when its run is missing (resuming a killed run) and loads it:
"""),
("md", r"""
**The engine.** Every model of the course trains through `lungsynth.engine.Trainer`: a model is a
`TrainTask` with named modules and optimisers. Here the task has two optimisers, `generator`
(the autoencoder) and `discriminator` (the patch GAN); the engine back-propagates each loss into
its own optimiser's parameters only, skips the discriminator while its loss is `None` (the
warm-up), writes `last.pt`/`final.pt` atomically (loadable with `weights_only=True`), and resumes
a killed run exactly where it stopped. The smoke profile trains the 3D kinds on random 32^3 cubes
(fully convolutional: trained on cubes, run on whole volumes) with a cosine learning rate.
"""),
("code", r"""
t0 = time.perf_counter()
models = {kind: ensure_autoencoder(kind, cfg, device="cpu") for kind in kinds}
print(f"ensure_autoencoder x4: {time.perf_counter() - t0:.0f} s (0 when the runs already exist)")
for kind in kinds:
    rec = json.loads((default_run_dir(kind, cfg.profile) / "run.json").read_text())
    print(f"{kind:8s} {rec['results']['steps']} steps, training {rec['timings_s'].get('train', 0):.0f} s, "
          f"scale factor {models[kind].scale_factor:.3f}")
fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 2.8))
for ax, kind in zip(axes, kinds):
    plot_metrics(default_run_dir(kind, cfg.profile), keys=["l1", "val_l1"], ax=ax)
    ax.set_title(kind)
fig.tight_layout()
plt.show()
"""),
("md", r"""
**The latent scale factor.** Diffusion assumes data of roughly unit variance; the encoder's
latents are not. After training, `scale_factor` = 1 / std of training latents is stored in the
checkpoint and applied by `encode_latent` / `decode_latent`.

**Why latents are cached as mean and std.** Later chapters cache the posterior of every training
volume once (`lungsynth autoencoder encode`) and draw $z=\mu+\sigma\epsilon$ each time an item is
loaded. Caching one sample would freeze that sample's noise into the data set, and the diffusion
loss could never fall below it.

## Reconstructions

The baseline at the same compression is plain resampling: average-pool x4, then trilinear
upsampling back. An autoencoder that does not beat it is not worth diffusing in.
"""),
("md", r"""
**Sliding windows.** A 256^3 volume does not fit through the decoder at once on many GPUs (the
widest activations are full-resolution). `encode`/`decode` take `roi_size`: the volume is
processed window by window (MONAI's sliding-window inferer handles the x4 zoom between latent
window and image window) and blended with Gaussian weights. `lungsynth bench vae` measures the
peak-memory ratio.
"""),
("code", r"""
vae3d = models["vae3d"]
item = source_dataset("vae3d", cfg, "val", keys=("label",))[0]
x = item["ct"][None]
with torch.no_grad():
    z_mean, z_std = vae3d.encode(x)
    recons = {"vae3d": vae3d.decode(z_mean),
              "vae3d, windows of 3/4": vae3d.decode(z_mean, roi_size=cfg.data.size_3d * 3 // 4, overlap=0.5),
              "resample x4 (area, trilinear)": resample_baseline(x, 4)}
print(f"latent {tuple(z_mean.shape)}, posterior std {z_std.mean():.4f} (mean)")
plot_reconstructions(x, recons, label=item["label"], title=item["scan_id"])
plt.show()
"""),
("code", r"""
table = evaluate_autoencoder(vae3d, cfg, split="val")
table.groupby("method").mean(numeric_only=True).round(3)
"""),
("md", r"""
`mae_hu_*` are mean absolute errors in HU over the body, the lungs and the nodules (by LIDC texture
1 ground-glass .. 5 solid); PSNR and SSIM are on the [0,1] scale. The two baselines keep one value
per 4^3 voxels (box average or trilinear sampling, then trilinear upsampling); the latent keeps
four, so beating them is the minimum an autoencoder must do.
"""),
("md", r"""
## What compression loses on small nodules

The 2D seed's authors worried that a x4 autoencoder erases small nodules. The error inside each
nodule, by size and texture, says how much:
"""),
("code", r"""
errors = nodule_errors(vae3d, cfg, split="val")
if len(errors):
    errors["size"] = pd.cut(errors.diameter_mm, [0, 10, 20, 100], labels=["<10 mm", "10-20 mm", ">20 mm"])
    display(errors.groupby(["size", "method"], observed=True).mae_hu.mean().unstack().round(0))
    display(errors.groupby(["texture", "method"]).mean_hu_error.mean().unstack().round(0))
"""),
("md", r"""
At smoke resolution (4 mm voxels) a nodule is a handful of voxels, smaller than one latent voxel:
the first table shows how much worse the small ones fare, the second whether the error is a bias
(a negative mean error: the nodule is washed out towards the lung around it).

## The 2D autoencoders and the mask VAE

The VQ-VAE (chapter 04) snaps every latent vector to the nearest of $K$ codebook entries,
$z_q = e_k,\ k = \arg\min_j \lVert z_e - e_j\rVert$, trained with the commitment loss
$\beta\lVert z_e - \mathrm{sg}[e_k]\rVert^2$ and EMA codebook updates. A healthy codebook uses many
codes: **usage** is the share of codes used at least once, **perplexity** $\exp(-\sum_k p_k\log p_k)$
the effective number of codes (1 = collapse, $K$ = uniform).

Nodules fill about 0.1% of a condition mask, so under a plain L1 the mask VAE learns to drop them.
Its L1 weights nodule voxels by `autoencoders.maskvae_nodule_weight` (10); in a smoke run this
raised the validation nodule Dice from 0 to about 0.3, above x4 resampling, at a lower MAE.
Read `nodule_dice` below.
"""),
("code", r"""
for kind in ("vqvae2d", "vae2d", "maskvae"):
    rows = evaluate_autoencoder(models[kind], cfg, split="val")
    print(kind, rows.groupby("method").mean(numeric_only=True).round(4).to_dict("index"))
slices = torch.stack([source_dataset("vqvae2d", cfg, "val")[i]["image"] for i in range(4)])
stats = codebook_stats(models["vqvae2d"].codebook_indices(slices), cfg.autoencoders.vq_num_embeddings)
print(f"VQ codebook: {stats['codes_used']} of {cfg.autoencoders.vq_num_embeddings} codes used, "
      f"usage {stats['usage']:.2f}, perplexity {stats['perplexity']:.1f}")
"""),
("code", r"""
for kind in ("vqvae2d", "vae2d", "maskvae"):
    ds = source_dataset(kind, cfg, "val")
    key = "cond" if kind == "maskvae" else "image"
    x2 = ds[0][key][None]
    with torch.no_grad():
        fig = plot_reconstructions(x2, {kind: models[kind].reconstruct(x2), "resample x4": resample_baseline(x2, 4)},
                                   window=(0, 1) if kind == "maskvae" else (-1000, 400), title=kind,
                                   hu_range=(0.0, 1.0) if kind == "maskvae" else (-1000.0, 400.0),
                                   max_err_hu=0.3 if kind == "maskvae" else 300.0,
                                   unit="" if kind == "maskvae" else "HU")
    plt.show()
"""),
("md", r"""
## Latent caches for the diffusion chapters

`lungsynth autoencoder encode --kind vae3d` (or `LatentDataset`, which encodes when needed) stores
the posterior mean and std of every volume. Each load draws a fresh $z=\mu+\sigma\epsilon$ and
multiplies it by the scale factor, so scaled latents have about unit variance:
"""),
("code", r"""
latents = LatentDataset(cfg, "vae3d", "train", keys=("cond",))
z = torch.stack([latents[i]["z"] for i in range(len(latents))])
print(f"{len(latents)} cached posteriors, z {tuple(z.shape[1:])}, std of scaled latents {z.std():.3f}, "
      f"cond {tuple(latents[0]['cond'].shape)}")
"""),
("md", r"""
**Try this**
- Train longer (`OVERRIDES = {"autoencoders.train_steps": 600}`) and watch the nodule error fall.
- Turn the perceptual loss on (`"autoencoders.perceptual_network": "astra"`) and compare.
- Kill a training run mid-way and call `ensure_autoencoder` again: it resumes from `last.pt`.
- Decode with smaller windows (`roi_size=32`) and see where tiles disagree with the whole pass.
- Give the VQ-VAE a larger codebook (`"autoencoders.vq_num_embeddings": 256`): does perplexity follow?
- Run `lungsynth bench vae --size 128` for the memory of decoding whole vs by windows.

## Summary

One engine trains every model of the course; four autoencoders give the latent spaces of LAND,
the 2D box/attribute LDM, HR-LDM and the text-to-image LDM, each checked against resampling at the
same compression. Next, LAND diffuses in the 3D KL-VAE's latent space.

Next: [03 — LAND](03_land.ipynb)
"""),
], "notebooks/02_autoencoders.ipynb")
