import sys
sys.path.insert(0, "tools")
from nb import build

build([
("md", r"""
# 00 — Welcome to lungsynth

A course that teaches, reproduces and extends **diffusion-based synthesis of chest CT with lung nodules**.
Five published systems are rebuilt on one small shared library, trained on LIDC-IDRI (or on an embedded
phantom built on real LIDC geometry), and judged by the same evaluation and the same downstream tasks.

**What you will learn**
- how the course is organised: chapters, the `lungsynth` library, the three profiles;
- how to run a chapter interactively, in batch with papermill, and at full scale on a GPU;
- what this machine has: versions, device, threads, which optional pretrained weights are installed.

**Needs:** nothing. This is the first chapter.
"""),
("params", """
PROFILE = None  # None: $LUNGSYNTH_PROFILE or "smoke"; also "course" or "full"
OVERRIDES = {}  # e.g. {"land.train_steps": 100}
"""),
("md", "## Setup\n\nEvery chapter starts the same way: the configuration of the chosen profile, with any overrides."),
("code", """
import pandas as pd

from lungsynth.config import get_config, profile_table
from lungsynth.course import chapters
from lungsynth.runtime import environment_report

cfg = get_config(PROFILE, OVERRIDES)
print("profile:", cfg.profile)
"""),
("md", r"""
## The course map

| chapter | what it teaches | method |
|---|---|---|
| 01 | LIDC-IDRI through pylidc; the phantom default; prepared volumes, masks, views | data |
| 02 | one training engine; 3D KL-VAE, 2D VQ-VAE, 2D KL-VAE, mask VAE | autoencoders |
| 03 | 3D latent diffusion from lung and nodule-texture masks | **LAND** |
| 04 | 2D latent diffusion from a nodule box and LIDC attributes | **bbox/attribute LDM** (Mari et al.) |
| 05 | latent inpainting of nodules with a histogram regulariser | **HR-LDM** |
| 06 | pixel-space 3D DDPM with anatomically aware sampling | **Lung-DDPM** |
| 07 | nodule ROIs from prompts written from LIDC scores | **text-to-image LDM** (Urata et al.) |
| 08 | sampling at scale into synthetic datasets | all |
| 09 | one evaluation for every method: the leaderboard | all |
| 10-11 | does synthetic data help nodule segmentation and classification? | all |

The chapters present in this checkout, in order:
"""),
("code", """
for chapter in chapters():
    print(chapter.number, "—", chapter.title())
"""),
("md", r"""
## Three profiles, one flag

One setting switches every chapter between a small demo and the papers' full run (as in d2l):
`smoke` runs the whole course in minutes on two CPU cores, `course` is for learning on a laptop or one
GPU, `full` holds the papers' settings. The table compares a few of the settings each profile picks.
"""),
("code", """
pd.DataFrame(profile_table()).set_index("setting")
"""),
("md", r"""
## Three ways to run a chapter

- **Interactively**: `make setup`, then `.venv/bin/jupyter lab notebooks/` and step through the cells.
- **In batch** with papermill, e.g. chapter 03 in the course profile:
  `.venv/bin/papermill notebooks/03_land.ipynb runs/03.ipynb -p PROFILE course`,
  or every chapter in order: `make course PROFILE=course` (or `lungsynth course run --profile course --from 03`).
- **At full scale on a GPU**: `PROFILE=full`; the training loop uses bf16 autocast on CUDA, and
  `torchrun --nproc_per_node N -m lungsynth land train --profile full` spreads training over N GPUs.

Every run writes `run.json` beside its outputs (config, seed, versions, git commit, timings), so each
figure can be traced to a command.

## What this machine has
"""),
("code", """
report = environment_report()
for key in ("device", "autocast", "threads", "cpu_count", "gpu"):
    if key in report:
        print(f"{key:>10}: {report[key]}")
print(pd.Series(report["versions"]).to_string())
pd.Series(report["optional_weights"], name="status").to_frame()
"""),
("md", r"""
Only pretrained weights that ship inside Python packages can be used offline: the I3ResNet-152 chest-CT
encoder (used for FID/KID/MMD in 3D) and the MiniLM text encoder (chapter 07). Code that uses
Stable Diffusion, MONAI perceptual networks, lungmask or TotalSegmentator is kept for users who have
those weights locally.

**Try this**
- Run `lungsynth course list` in a terminal, then `lungsynth course run --only 00`.
- Re-run this notebook with `OVERRIDES = {"data.n_scans": 4}` and look at how `profile_table` changes.

## Summary

The course is a set of numbered notebooks over one library; one flag picks the scale; every run
records what it did. Next we build the data every method trains on.

Next: [01 — LIDC-IDRI through pylidc, and the phantom default](01_data.ipynb)
"""),
], "notebooks/00_welcome.ipynb")
