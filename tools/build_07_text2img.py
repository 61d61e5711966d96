import sys
sys.path.insert(0, "tools")
from nb import build

build([
("md", r"""
# 07 — Text-to-image latent diffusion of nodule ROIs from LIDC scores

Urata et al. fine-tune Stable Diffusion on LIDC nodule regions of interest with prompts written from
the radiologists' scores, sweep the classifier-free guidance scale and find 5 best. Stable Diffusion
weights cannot be downloaded here, so this chapter trains **the same architecture** (a diffusers
`UNet2DConditionModel` cross-attending to a frozen text encoder, on the latents of a KL-VAE) with the
MiniLM text encoder that ships in a Python package; with a local Stable Diffusion folder
(`--pretrained DIR`) it fine-tunes the real weights with their own CLIP encoder, as the paper does.

**What you will learn**
- how prompts are written from LIDC scores, and why that makes text consistency measurable;
- the Stable Diffusion objective and classifier-free guidance, next to the code;
- how the guidance scale trades fidelity (FID/KID) against diversity (MS-SSIM) and attribute recovery.

**Needs:** chapter 01 (prepared data: ROIs of side 2 x diameter on the centre slice) and chapter 02
(the 2D KL-VAE). Both are built here when missing.
"""),
("params", """
PROFILE = None  # None: $LUNGSYNTH_PROFILE or "smoke"
OVERRIDES = {}  # e.g. {"text2img.train_steps": 500}
PRETRAINED = None  # a local diffusers Stable Diffusion folder to fine-tune, or None
"""),
("md", "## Setup"),
("code", """
import matplotlib.pyplot as plt

from lungsynth.config import get_config
from lungsynth.data.prompts import write_prompt
from lungsynth.engine import plot_metrics
from lungsynth.methods import text2img
from lungsynth.methods.text2img.core import roi_dataset
from lungsynth.methods.text2img.evaluate import guidance_sweep, sweep_table
from lungsynth.viz import image_grid

cfg = get_config(PROFILE, OVERRIDES)
train_rois = roi_dataset(cfg, "train")
print(f"profile {cfg.profile}: {len(train_rois)} training ROIs of {cfg.data.roi_size}^2")
"""),
("md", r"""
## Prompts written from scores

Five of LIDC's nine characteristics become one sentence (`lungsynth.data.prompts.write_prompt`):
sphericity (1 linear .. 5 round), internal texture (1 ground-glass .. 5 solid), margin (1 poorly
defined .. 5 sharp), spiculation (1 none .. 5 marked) and calcification (1 popcorn .. 6 none). A
reader median such as 3.5 is rounded half up. Every one of the 3750 score combinations gives a
distinct sentence, and `parse_prompt` inverts it: that is what lets us check whether a generated
image shows what its prompt asked for.
"""),
("code", """
print(write_prompt({"sphericity": 4, "texture": 5, "margin": 4, "spiculation": 1, "calcification": 6}))
items = [train_rois[i] for i in range(min(6, len(train_rois)))]
image_grid([it["image"] for it in items], titles=[f"tex {it['scores']['texture']} sph {it['scores']['sphericity']}"
                                                   for it in items], ncols=6, window=(0, 1))
plt.show()
"""),
("md", r"""
## The model and its objective

With the frozen encoder $\mathcal{E}$ (scaled to unit latent variance) and text encoder $\tau$:

$$z_0 = s\,\mathcal{E}(x),\quad z_t = \sqrt{\bar\alpha_t}\,z_0 + \sqrt{1-\bar\alpha_t}\,\epsilon,\quad
\mathcal{L} = \big\lVert \epsilon - \epsilon_\theta(z_t, t, \tau(y)) \big\rVert_2^2,$$

where the prompt $y$ is replaced by the empty prompt with probability $p$ (`text2img.prompt_dropout`),
so one network learns both the conditional and the unconditional prediction. Training augments
ROIs with 90-degree rotations and flips; the DDPM schedule is Stable Diffusion's (scaled-linear
betas 0.00085..0.012, 1000 steps). `Text2ImgTask.training_step` is exactly these lines.
"""),
("code", """
model = text2img.ensure_trained(cfg, PRETRAINED)  # trains (or resumes) when no final checkpoint exists
run_dir = text2img.default_run_dir(cfg, PRETRAINED)
print("U-Net parameters:", sum(p.numel() for p in model.unet.parameters()), "| text encoder:", model.text.name)
plot_metrics(run_dir, keys=["loss"])
plt.show()
"""),
("md", r"""
## Classifier-free guidance, swept

At sampling time (DDIM, `text2img.sample_steps` steps) the two predictions are combined:

$$\hat\epsilon = \epsilon_\theta(z_t, t, \tau(y)) + (s-1)\big(\epsilon_\theta(z_t,t,\tau(y)) - \epsilon_\theta(z_t,t,\tau(\varnothing))\big),$$

which is $\epsilon_\varnothing + s(\epsilon_y - \epsilon_\varnothing)$; at $s=1$ it is the conditional
prediction exactly (a test checks this bit for bit). For each scale of the paper's sweep we generate
ROIs for the prompts of held-out nodules and measure FID/KID (with the course's 2D feature network,
trained on real ROIs — its name is in the table), diversity (mean MS-SSIM between generated ROIs,
lower is more diverse) and **attribute recovery**: a classifier trained on real ROIs predicts each
prompted attribute from the generated image. CLIPScore and BiomedCLIP, which the paper's
text-consistency numbers would use, need weights that cannot be had offline.
"""),
("code", """
rows = guidance_sweep(cfg, model)
sweep_table(rows).round(3)
"""),
("code", """
swept = [r for r in rows if r["guidance"] != "real"]
images = [img for r in swept for img in r["images"]]
titles = [f"s = {r['guidance']:g}" if j == 0 else "" for r in swept for j in range(len(r["images"]))]
image_grid(images, titles=titles, ncols=len(swept[0]["images"]), window=(0, 1))
plt.show()
"""),
("md", r"""
Each row of the grid is one guidance scale, each column one held-out prompt, with the same starting
noise in every row, so only the guidance changes. In the smoke profile the model has seen a few
dozen ROIs for a few dozen steps: read the table for its shape, not its values.

## Fine-tuning real Stable Diffusion weights

If you have a Stable Diffusion 1.x folder saved with diffusers (`model_index.json`, `unet/`, `vae/`,
`text_encoder/`, `tokenizer/`, `scheduler/`), run this chapter with `PRETRAINED = "/path/to/sd"` or
`lungsynth text2img train --pretrained /path/to/sd --profile full`: the U-Net is fine-tuned with
AdamW at lr 1e-6 as in the paper, with the pipeline's own CLIP encoder and VAE (grey ROIs are
repeated to three channels). A folder that is not a diffusers pipeline is refused with the list of
what is missing.

**Try this**
- Sweep finer around the paper's best scale: `guidance_sweep(cfg, model, scales=(2, 3, 5, 7))`.
- Compare DDIM and PNDM: `OVERRIDES = {"text2img.sampler": "pndm"}`.
- Raise `text2img.prompt_dropout` to 0.3 and watch recovery at low guidance.

## Summary

Prompts written from five LIDC scores condition a Stable-Diffusion-architecture U-Net through a
frozen text encoder; classifier-free guidance trades diversity for fidelity, and attribute recovery
measures text consistency without CLIP. Next we sample every method at scale into synthetic datasets.

Next: [08 — Sampling at scale](08_sampling.ipynb)
"""),
], "notebooks/07_text2img.ipynb")
