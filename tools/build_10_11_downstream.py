"""Build notebooks/10_downstream_segmentation.ipynb and notebooks/11_downstream_classification.ipynb."""
import sys

sys.path.insert(0, "tools")
from nb import build  # noqa: E402

PARAMS = """
PROFILE = None  # None: $LUNGSYNTH_PROFILE or "smoke"; also "course" or "full"
OVERRIDES = {}  # e.g. {"downstream.n_runs": 3, "downstream.seg_steps": 50}
SYNTHETIC = None  # None: build one from the cheapest trained 3D method; or "path/D1,path/D2"
"""

SETUP = """
import matplotlib.pyplot as plt
import pandas as pd

from lungsynth.config import get_config
from lungsynth.data.datasets import ensure_prepared
from lungsynth.downstream.common import ensure_synthetic, load_pools
from lungsynth.sampling.registry import METHODS, trained_methods

cfg = get_config(PROFILE, OVERRIDES)
real_root = ensure_prepared(cfg, verbose=False)
trained = [m for m in trained_methods(cfg) if METHODS[m].unit == "volume"]
print("trained 3D methods:", trained or "none (Lung-DDPM will be trained first)")
if SYNTHETIC is None:
    SYNTHETIC = str(ensure_synthetic(cfg))  # conditions="sampler": training masks only
print("synthetic data:", SYNTHETIC)
print(pd.read_csv(f"{SYNTHETIC.split(',')[0]}/provenance.csv")[
    ["sample_id", "method", "condition_scan_id", "condition_split"]].head())
"""

nb10 = [
("md", r"""
# 10 — Downstream segmentation: does synthetic data help find and delineate nodules?

The methods of chapters 03-07 are judged by image metrics in chapter 09. Their papers justify them by
**downstream gains**: Lung-DDPM trains a nodule segmenter on whole CT volumes with synthetic volumes added at
growing ratios. This chapter reproduces that experiment with MONAI's AttentionUnet, on whole volumes and on
nodule-centred crops, over several seeds.

**What you will learn**
- how a *synthetic ratio* is defined (synthetic count = ratio x real count) and how a training set is mixed;
- why no test patient may reach training, not even as the condition (mask) a synthetic volume was generated
  from, and how the provenance table of a synthetic dataset lets us check it;
- Dice, sensitivity and specificity per volume, and how to report them over seeds with their spread.

**Needs**: [01 — Data](01_data.ipynb), [08 — Sampling](08_sampling.ipynb) and one trained 3D method
([06 — Lung-DDPM](06_lung_ddpm.ipynb) is trained on demand when none is).
"""),
("params", PARAMS),
("md", r"""
## Setup: real data and a synthetic dataset

The synthetic dataset comes from the cheapest trained 3D method (ask `trained_methods(cfg)`), sampled with
`conditions="sampler"`: every synthetic volume is generated from the lung and nodule masks of a **training**
scan. (Chapter 08's `heldout` datasets are conditioned on test masks: right for evaluation, a leak here.)
"""),
("code", SETUP),
("md", r"""
## Mixing real and synthetic volumes

With $n_\text{real}$ real training volumes, ratio $r$ adds $\operatorname{round}(r\,n_\text{real})$ synthetic
ones: $r=0$ is real only, $r=1$ doubles the set (half of it synthetic). The guard `check_no_leak` reads each
synthetic item's `condition_patient` (from `provenance.csv`) and refuses any held-out patient.
In smoke the pool is smaller than $n_\text{real}$, so `downstream.allow_repeats` lets items repeat.
"""),
("code", """
from lungsynth.downstream.mixing import check_no_leak, composition, mix_ratio

pools = load_pools(cfg, "volume", SYNTHETIC)
print("held-out patients (never in training):", sorted(pools.heldout))
rows = [{"ratio": r, **composition(mix_ratio(pools.train, pools.synthetic, r, 0, cfg.downstream.allow_repeats))}
        for r in cfg.downstream.synthetic_ratios]
pd.DataFrame(rows)
"""),
("md", "The guard at work: one evaluation volume slipped into the training table is refused, with its patient named."),
("code", """
leaky = pd.concat([pools.train, pools.evaluation.iloc[:1]])
try:
    check_no_leak(leaky, pools.heldout)
except ValueError as err:
    print("refused:", err)
"""),
("md", r"""
## Whole volumes (Lung-DDPM's setting)

AttentionUnet (attention gates on the skip connections) at `cfg.data.size_ddpm`$^3$, trained through the
engine with the Dice + cross-entropy loss (MONAI `DiceCELoss`):

$$\mathcal{L} = 1 - \frac{2\sum_v p_v g_v}{\sum_v p_v + \sum_v g_v} \; - \; \frac{1}{|V|}\sum_v \sum_c g_{v,c}\log p_{v,c}.$$

Per evaluation volume, voxel-wise: $\text{Dice} = \frac{2TP}{2TP+FP+FN}$,
$\text{sensitivity} = \frac{TP}{TP+FN}$, $\text{specificity} = \frac{TN}{TN+FP}$; then mean $\pm$ standard
deviation over `cfg.downstream.n_runs` seeds.
"""),
("code", """
from lungsynth.downstream.metrics import mean_pm_std
from lungsynth.downstream.segmentation import METRICS, run_segmentation

vol = run_segmentation(cfg, SYNTHETIC, settings=("volume",))
print(f"{len(vol.runs)} trainings in {vol.seconds:.0f} s")
mean_pm_std(vol.table, METRICS)
"""),
("md", r"""
## Nodule-centred crops

The same network on `cfg.downstream.seg_crop_size`$^3$ crops at 1 mm around every nodule (real crop views;
crops cut from the synthetic volumes around each synthetic nodule's centroid). The task is easier — the nodule is
in the middle — so Dice is higher and specificity is no longer dominated by the empty chest.
"""),
("code", """
crop = run_segmentation(cfg, SYNTHETIC, settings=("crop",))
mean_pm_std(crop.table, METRICS)
"""),
("code", """
fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
for res in (vol, crop):
    t = res.table
    for ax, m in zip(axes, METRICS):
        ax.errorbar(t["ratio"], t[f"{m}_mean"], yerr=t[f"{m}_std"], marker="o", capsize=3, label=t["setting"][0])
        ax.set(xlabel="synthetic ratio (synthetic / real)", title=m)
axes[0].legend()
plt.tight_layout()
"""),
("md", "One real and one synthetic training volume as the network sees them (centre slice, nodule outline in red):"),
("code", """
from lungsynth.downstream.data import ItemDataset

items = {"real": ItemDataset(cfg, pools.train, "volume", cfg.data.size_ddpm)[0],
         "synthetic": ItemDataset(cfg, pools.synthetic, "volume", cfg.data.size_ddpm)[0]}
fig, axes = plt.subplots(1, 2, figsize=(6, 3))
for ax, (name, it) in zip(axes, items.items()):
    z = int(it["target"][0].sum((1, 2)).argmax())
    ax.imshow(it["image"][0, z], cmap="gray")
    ax.contour(it["target"][0, z], levels=[0.5], colors="r")
    ax.set_title(name)
    ax.axis("off")
"""),
("md", r"""
**Reading the numbers.** In the smoke profile the networks train for ten steps on nine phantom scans with
a handful of synthetic volumes, and are evaluated on three scans: these numbers are **demonstrations of the
pipeline, not evidence** about any method. The `course` and `full` profiles train for thousands of steps, on a
synthetic pool at least as large as the real set (no repeats), over 3-5 seeds.

**Try this**
- `OVERRIDES={"downstream.seg_steps": 100, "downstream.n_runs": 3}`: do the error bars shrink?
- Pass two synthetic datasets, `SYNTHETIC="runs/smoke/synthetic/downstream_lung_ddpm,runs/smoke/synthetic/downstream_land"`,
  to mix methods.
- From a terminal: `lungsynth downstream seg --profile smoke --synthetic D1,D2 --ratio 0,0.5,1`.
- Build a synthetic dataset with `lungsynth synth --conditions heldout` and pass it: the guard refuses it.

## Summary

- A synthetic ratio $r$ adds $r\,n_\text{real}$ synthetic items to the whole real train set; the test patients
  never reach training, neither as images nor as the masks that conditioned a synthetic image (provenance).
- AttentionUnet on whole volumes and on nodule crops, trained through the one engine with Dice + CE, reported
  as Dice / sensitivity / specificity mean ± std over seeds.

Next: [11 — Downstream classification](11_downstream_classification.ipynb)
"""),
]

nb11 = [
("md", r"""
# 11 — Downstream classification: subtypes, scarcity and malignancy with synthetic nodules

HR-LDM justifies histogram-regularised inpainting by what it does for a **nodule classifier**: the rare
subtypes (part-solid, ground-glass) are topped up with synthetic nodules, and the classifier is compared
by AUROC / AUPRC per subtype and size, over independent runs, with significance tests. This chapter reproduces
that protocol with MONAI's 3D DenseNet121, adds the data-scarcity ablation and malignancy prediction.

**What you will learn**
- one-vs-rest AUROC and AUPRC per class, stratified by nodule size, and why AUPRC matters for rare classes;
- the two-sided Mann-Whitney U test between two settings over independent runs;
- balancing minority classes with synthetic nodules; the scarcity ablation (100/50/20/10/0% of the real data,
  with proportional and with full synthetic data);
- transfer: a malignancy classifier initialised from the subtype model against one trained from scratch.

**Needs**: [01 — Data](01_data.ipynb), [08 — Sampling](08_sampling.ipynb), [10 — Downstream segmentation](10_downstream_segmentation.ipynb)
(the same synthetic dataset is reused), and one trained 3D method.
"""),
("params", PARAMS),
("md", r"""
## Setup

Synthetic nodules should come from HR-LDM inpainting (subtype-conditioned) or LAND texture control when they
are trained; otherwise the cheapest trained 3D method provides volumes whose nodules keep the subtype of the
training condition. Every synthetic nodule becomes a 1 mm crop of `cfg.data.crop_size`$^3$ (90 at full scale)
cut around its centroid.
"""),
("code", SETUP),
("code", """
from lungsynth.downstream.mixing import balance_classes

pools = load_pools(cfg, "nodule", SYNTHETIC)
balanced, report = balance_classes(pools.train, pools.synthetic, "subtype_id", cfg.seed, (0, 1, 2),
                                   cfg.downstream.allow_repeats)
pd.DataFrame(report).T.rename(index={0: "solid", 1: "part-solid", 2: "ground-glass"})
"""),
("md", r"""
## The metrics

For class $k$ against the rest, with scores $s_i$ = the softmax probability of $k$:
$\text{AUROC}_k = P(s_i > s_j \mid y_i = k,\, y_j \ne k)$ (ties count 1/2) and
$\text{AUPRC}_k = \sum_n (R_n - R_{n-1}) P_n$ (average precision over the ranked list). A random classifier
has AUROC 0.5 but AUPRC equal to the class's prevalence — which is why the rare subtypes are read by AUPRC.
Between two settings we compare the per-run values with the two-sided Mann-Whitney U test
($U = \sum_{i,j} [a_i > b_j] + \tfrac12 [a_i = b_j]$). With 2 runs per setting the smallest possible p is 0.33:
significance needs the `full` profile's 5 runs or more.

Malignancy uses the LIDC median score: **4-5 malignant, 1-2 benign, 3 (indeterminate) left out** of training and
evaluation.
"""),
("code", """
from lungsynth.downstream.classification import plot_pr_curves, run_classification

res = run_classification(cfg, SYNTHETIC)
print(f"all experiments in {res.seconds:.0f} s")
res.composition
"""),
("md", "### Subtype AUROC / AUPRC (mean ± std over runs), with Mann-Whitney p (balanced vs real)"),
("code", """
from lungsynth.downstream.metrics import mean_pm_std

table = mean_pm_std(res.subtype_table, ["auroc", "auprc"])
cols = ["size", "class", "setting", "auroc", "auprc", "p_auroc", "p_auprc"]
table[table["size"] == "all"][cols]
"""),
("md", "By nodule size (6-10, 10-20, 20-30 mm; `n/a` where a stratum has no nodule of that subtype):"),
("code", """
by_size = table[table["size"] != "all"][cols]
by_size.pivot_table(index=["size", "class"], columns="setting", values="auroc", aggfunc="first")
"""),
("md", "Precision-recall curves of the first run of each setting (a class absent from the evaluation set has no curve):"),
("code", """
plot_pr_curves(res, "subtype")
plt.tight_layout()
"""),
("md", r"""
### Scarcity

The real train set is cut to each fraction $f$ of `cfg.downstream.real_fractions` (nested, stratified by subtype),
then trained alone (`real`), with the same fraction of the synthetic pool (`proportional`) and with all of it
(`full`); at $f=0$ only `full` exists (synthetic only). Smoke runs a subset of fractions, once each.
"""),
("code", """
sc = mean_pm_std(res.scarcity_table, ["macro_auroc", "macro_auprc"])
sc.pivot_table(index="real_fraction", columns="synthetic", values="macro_auroc", aggfunc="first").sort_index(ascending=False)
"""),
("md", "### Malignancy: from scratch vs initialised from the subtype model"),
("code", """
display(mean_pm_std(res.malignancy_table, ["auroc", "auprc"]))
plot_pr_curves(res, "malignancy")
plt.tight_layout()
"""),
("md", r"""
**Reading the numbers.** Smoke trains a slim DenseNet121 (8 initial features) for ten steps on ~30 phantom
nodules and evaluates on ten: the tables are **demonstrations of the protocol, not results**; the `full` profile
holds the published settings (90$^3$ crops at 1 mm, thousands of steps, 5 runs).

**Try this**
- Train HR-LDM (chapter 05) and build a subtype-balanced dataset:
  `lungsynth synth --method hr_ldm --conditions sampler --n 64 --out runs/smoke/synthetic/hr_balanced`, then set
  `SYNTHETIC` to it: HR-LDM draws the inpainted subtype uniformly, so the minority classes fill up.
- `OVERRIDES={"downstream.n_runs": 5}`: the Mann-Whitney p-values can now fall below 0.05.
- From a terminal: `lungsynth downstream cls --profile smoke --synthetic D1,D2 --experiments subtype --ratio 0,0.5,1`
  (`--ratio` adds random, unbalanced mixes at those synthetic ratios, as in chapter 10).

## Summary

- Minority subtypes were topped up with synthetic nodules; AUROC and AUPRC per subtype and size over independent
  runs, with two-sided Mann-Whitney U p-values, say whether that helped.
- The scarcity ablation shows how much real data synthetic data can replace; malignancy (4-5 vs 1-2, 3 left
  out) tests whether the subtype model transfers.
- This is the last chapter: the course went from LIDC-IDRI data to five synthesis methods, one evaluation, and
  the downstream tasks that justify them.

Back to the start: [00 — Welcome](00_welcome.ipynb)
"""),
]

build(nb10, "notebooks/10_downstream_segmentation.ipynb")
build(nb11, "notebooks/11_downstream_classification.ipynb")
