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
("params", """
PROFILE = None  # None: $LUNGSYNTH_PROFILE or "smoke"
OVERRIDES = {}  # e.g. {"autoencoders.train_steps": 500}
"""),
("md", "## Setup"),
("code", """
import matplotlib.pyplot as plt
import pandas as pd

from lungsynth.config import get_config
from lungsynth.data.datasets import ensure_prepared
from lungsynth.engine import plot_metrics
from lungsynth.nn.ae_eval import evaluate_autoencoder, nodule_errors, plot_reconstructions, resample_baseline
from lungsynth.nn.ae_training import source_dataset
from lungsynth.nn.autoencoders import default_run_dir, ensure_autoencoder

cfg = get_config(PROFILE, OVERRIDES)
ensure_prepared(cfg, verbose=False)
print(f"profile {cfg.profile}: 3D volumes {cfg.data.size_3d}^3, training cubes {cfg.autoencoders.patch_3d}^3")
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
("code", """
kinds = ("vae3d", "maskvae", "vqvae2d", "vae2d")
models = {kind: ensure_autoencoder(kind, cfg) for kind in kinds}
fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 2.8))
for ax, kind in zip(axes, kinds):
    plot_metrics(default_run_dir(kind, cfg.profile), ax=ax)
    ax.set_title(f"{kind} (scale factor {models[kind].scale_factor:.2f})")
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
("code", """
vae3d = models["vae3d"]
item = source_dataset("vae3d", cfg, "val", keys=("label",))[0]
x = item["ct"][None]
recons = {"vae3d": vae3d.decode(vae3d.encode(x)[0]), "resample x4": resample_baseline(x, 4)}
plot_reconstructions(x, recons, label=item.get("label"))
plt.show()
"""),
("code", """
table = evaluate_autoencoder(vae3d, cfg, split="val")
table.groupby("method").mean(numeric_only=True).round(3)
"""),
("md", r"""
## What compression loses on small nodules

The 2D seed's authors worried that a x4 autoencoder erases small nodules. The error inside each
nodule, by size and texture, says how much:
"""),
("code", """
errors = nodule_errors(vae3d, cfg, split="val")
errors.groupby(["method", "texture"]).mae_hu.mean().unstack(0).round(0) if len(errors) else errors
"""),
("code", """
for kind in ("vqvae2d", "vae2d", "maskvae"):
    rows = evaluate_autoencoder(models[kind], cfg, split="val", max_items=8)
    print(kind, rows.groupby("method").mean(numeric_only=True).round(3).to_dict("index"))
"""),
("md", r"""
**Try this**
- Train longer (`OVERRIDES = {"autoencoders.train_steps": 600}`) and watch the nodule error fall.
- Turn the perceptual loss on (`"autoencoders.perceptual_network": "astra"`) and compare.
- Kill a training run mid-way and call `ensure_autoencoder` again: it resumes from `last.pt`.

## Summary

One engine trains every model of the course; four autoencoders give the latent spaces of LAND,
the 2D box/attribute LDM, HR-LDM and the text-to-image LDM, each checked against resampling at the
same compression. Next, LAND diffuses in the 3D KL-VAE's latent space.

Next: [03 — LAND](03_land.ipynb)
"""),
], "notebooks/02_autoencoders.ipynb")
