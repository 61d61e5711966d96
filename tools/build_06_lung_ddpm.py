"""Build notebooks/06_lung_ddpm.ipynb (run from the repository root: python tools/build_06_lung_ddpm.py)."""

import sys

sys.path.insert(0, "tools")
from nb import build  # noqa: E402

cells: list[tuple[str, str]] = []


def md(text: str) -> None:
    cells.append(("md", text))


def code(text: str, tags=None) -> None:
    cells.append(("params" if tags == ["parameters"] else "code", text))


md(r"""
# 06 — Lung-DDPM: pixel-space 3D DDPM with anatomically aware sampling

Lung-DDPM (Jiang et al. 2025) generates a whole chest-CT volume, voxel by voxel (no autoencoder), from a
**semantic layout** — background, lung, nodule — and keeps everything outside the lungs anatomically
exact with **anatomically aware sampling (AAS)**: at every reverse step the region outside the lungs is
replaced by the reference CT diffused to the same noise level.

**What you will learn**
- how a layout is turned into a condition that is concatenated to $x_t$, and how a 3D U-Net with residual
  and attention blocks is trained with an L1 loss on $\epsilon$ under a cosine schedule (T = 250) and EMA;
- how AAS blends the model's step inside the lungs with the forward-diffused reference outside, so the
  final volume equals the reference there exactly;
- how to read the ablation table of the paper (Table IV): with AAS, without AAS, without the lung in the
  layout — FID and MMD on 3D chest-CT features, MSE inside the lungs, and a seam measure at the lung boundary.

**Needs**: chapter 01 (the prepared volumes; built here when missing) and chapter 02's training engine.
Everything heavy lives in `lungsynth/methods/lung_ddpm/` (layout, model, evaluation).
""")
code('''
PROFILE = None  # None: $LUNGSYNTH_PROFILE or "smoke"; also "course" or "full"
OVERRIDES = {}  # e.g. {"lung_ddpm.train_steps": 200, "lung_ddpm.sample_steps": 250}
''', ["parameters"])
md("""
## Setup

The profile picks the volume size (`data.size_ddpm`: 32³ smoke, 64³ course, 128³ full as in the paper), the
U-Net widths and the training budget. The `full` profile holds the paper's settings: 64 base channels,
cosine schedule with 250 steps, lr 1e-5, batch 1, 100k steps, EMA 0.995 from step 2000 every 10 steps.
""")
code('''
import pandas as pd
import torch

from lungsynth.config import get_config
from lungsynth.engine import plot_metrics
from lungsynth.methods import lung_ddpm as ld
from lungsynth.viz import show_slices

torch.manual_seed(0)
cfg = get_config(PROFILE, OVERRIDES)
c = cfg.lung_ddpm
pd.Series({"profile": cfg.profile, "volume": f"{cfg.data.size_ddpm}^3", "U-Net channels": c.unet_channels,
           "attention at levels": c.attention_at, "T (cosine)": c.num_train_timesteps, "lr": c.lr,
           "train steps": c.train_steps, "EMA": f"{c.ema_decay} from {c.ema_start} every {c.ema_every}",
           "sampling steps": c.sample_steps, "AAS from t <=": c.blend_from}).to_frame("setting")
''')
md(r"""
## The semantic layout

From the prepared lung mask and nodule label map, each voxel gets a label
$y \in \{0\ \text{background},\ 1\ \text{lung},\ 2\ \text{nodule}\}$ (a nodule overrides the lung, so
juxta-pleural nodules are generated too). The network sees it one-hot encoded,
$c = \mathrm{onehot}(y) \in \{0,1\}^{3 \times S^3}$, concatenated to $x_t$ on the channel axis.
The ablation *without the lung layout* merges the lung into the background ($c$ has 2 channels).
A layout with any other value is refused with a `ValueError`.
""")
code('''
data = ld.eval_volumes(cfg)  # the evaluation split: real CT [N, 1, S, S, S] in [0, 1] and its layout
print(len(data["scan_id"]), "volumes:", data["scan_id"])
ref, layout = data["ct"][0], data["layout"][0]
print("layout labels:", torch.unique(layout).tolist(), "| channels:", ld.layout_channels(layout[None]).shape[1],
      "| without the lung:", ld.layout_channels(layout[None], lung_layout=False).shape[1])
fig = show_slices(ref[0], {"lung": layout[0] >= 1, "nodule": layout[0] == 2}, n=4,
                  window=(0, 1), title="reference CT with its layout")
''')
md(r"""
## Training: L1 on $\epsilon$, cosine schedule, EMA

Forward diffusion $x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon$ with the cosine schedule
(Nichol & Dhariwal 2021) $\bar\alpha_t = f(t)/f(0)$, $f(t) = \cos^2\!\big(\tfrac{t/T + s}{1+s}\cdot\tfrac{\pi}{2}\big)$,
$s = 0.008$, $T = 250$ (MONAI's `cosine` schedule). The CT is scaled to $[-1, 1]$. The loss (paper Alg. 1):

$$\mathcal{L} = \big\lVert \epsilon - \epsilon_\theta([x_t, c], t) \big\rVert_1 .$$

The engine keeps an EMA copy of the weights — after optimiser step $k$ (every `ema_every` steps)
$\theta_{\text{EMA}} \leftarrow 0.995\,\theta_{\text{EMA}} + 0.005\,\theta$ from `ema_start` on (a plain copy
before) — and sampling uses the EMA weights. `ensure_trained` trains when the run has no final
checkpoint and resumes a killed run.
""")
code('''
sched = ld.build_scheduler(cfg)
ab = sched.alphas_cumprod
print("alpha_bar at t = 0, T/4, T/2, 3T/4, T-1:",
      [round(float(ab[int(f * (len(ab) - 1))]), 4) for f in (0, 0.25, 0.5, 0.75, 1)])
runs = {v: ld.ensure_trained(cfg, v) for v in ld.VARIANTS}  # Lung-DDPM and the "w/o lung layout" ablation
for v, run in runs.items():
    print(f"{v:15s} {run}")
ax = plot_metrics(runs["layout"] / "metrics.csv", keys=["loss"])
''')
md(r"""
## Anatomically aware sampling

One reverse step gives the model's $\hat x_{t-1}$ (DDPM posterior). AAS (paper Alg. 2) then sets

$$x_{t-1} = m_l \odot \hat x_{t-1} + m_e \odot q(x_{\text{ref}}, t-1), \qquad m_e = 1 - m_l,$$

where $m_l$ marks the lungs (lung or nodule in the layout) and
$q(x_{\text{ref}}, t-1) = \sqrt{\bar\alpha_{t-1}}\,x_{\text{ref}} + \sqrt{1-\bar\alpha_{t-1}}\,\epsilon'$ is the
reference diffused to the same noise level, for every step with $t \le$ `blend_from`. At the last step
$q(x_{\text{ref}}, -1) = x_{\text{ref}}$, so outside the lungs the sample **is** the reference. The blend is the
shared hook `lungsynth.diffusion.samplers.anatomically_aware`; `LungDDPM.sample` wires it in:
""")
code('''
model = ld.load(cfg, "layout")
x = model.sample(layout[None], ref[None], aas=True, generator=torch.Generator().manual_seed(0))
outside = ~ld.generation_mask(layout[None])
print("equal to the reference outside the lungs:", torch.equal(x[outside], ref[None][outside]))
print("MSE inside the lungs:", float(((x - ref[None]) ** 2)[~outside].mean()))
''')
md("""
## The ablation table (paper Table IV)

Three rows, each sampled for every evaluation volume with the same seeds:
**Lung-DDPM (AAS)**; **w/o AAS** (same weights, plain sampling: the model also invents the body);
**w/o lung layout** (the model trained with background/nodule only, sampled with AAS).
Columns: FID and MMD between the features of real and synthetic volumes (the packaged I3ResNet-152 chest-CT
encoder, `lungsynth.eval`), MSE inside the lungs against the paired real volume, and the **seam ratio**:
the mean gradient magnitude in a one-voxel shell on both sides of the lung boundary, sample over real
(1 = as sharp as the real anatomy; above 1, a visible seam). In smoke, a handful of volumes and a model
trained for seconds (40 steps of a pixel-space DDPM: the lungs are still mostly noise — the `course` profile
trains 5000 steps at 64³): read the mechanics and the columns, not the numbers; FID from so few samples is
unstable. What already holds after 40 steps: with AAS everything outside the lungs is the reference.
""")
code('''
out = {}
table = ld.evaluate(cfg, outputs=out)
pd.DataFrame(table).T[["fid", "mmd", "masked_mse", "seam_ratio", "n", "sample_s_per_volume"]]
''')
md("""
## Reference, layout and samples side by side

The lung contour is drawn on every sample. With AAS the body, mediastinum and bones are the reference's;
without AAS the model generates them from the layout alone.
""")
code('''
i = 0
samples = {row: out["samples"][row][i] for row in out["samples"]}
fig = ld.figure_side_by_side(out["real"][i], out["layout"][i], samples)
''')
md("""
## Consistency along z

Lung-DDPM denoises the whole volume at once, so consecutive slices should change smoothly — no
slice-to-slice flicker as with stacked 2D generators. Five consecutive axial slices through the nodule:
""")
code('''
vols = {"reference": out["real"][i], "AAS": samples["Lung-DDPM (AAS)"], "w/o AAS": samples["w/o AAS"]}
fig = ld.figure_consecutive_slices(vols, out["layout"][i], n=5)
''')
md("""
## Try this

- Sample with all 250 steps (`OVERRIDES = {"lung_ddpm.sample_steps": 250}`) and compare the seam ratio.
- Start AAS late (`model.sample(..., blend_from=50)`): the model generates freely first, then is pulled
  back to the reference. What happens at the lung boundary?
- Train longer (`"lung_ddpm.train_steps": 400`) and watch the masked MSE and FID of the three rows.
- Swap the layout encoding for a single scaled channel (`"lung_ddpm.layout_encoding": "scaled"`).
- From the command line: `lungsynth lung-ddpm sample --profile smoke --no-aas` writes NIfTI volumes, and
  `lungsynth bench lung-ddpm` measures what AAS costs per step.
""")
md(r"""
## Summary

Lung-DDPM is a plain pixel-space DDPM conditioned by concatenating a three-label layout, trained with L1 on
$\epsilon$ under a cosine schedule and sampled with EMA weights. AAS makes every voxel outside the lungs the
reference's, bit for bit, so only the lungs and nodules are synthetic; the seam ratio checks that the
paste does not show. Chapters 08-11 sample it with `ld.load(cfg).sample(layout, reference)`.

Next: [07 — Text-to-image LDM](07_text2img.ipynb)
""")

for kind, source in cells:
    if kind != "md":
        assert len(source.strip("\n").splitlines()) <= 30, source[:80]
build(cells, "notebooks/06_lung_ddpm.ipynb")
