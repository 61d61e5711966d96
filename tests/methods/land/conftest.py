"""Shared fixtures of the chapter 03 (LAND) tests: a tiny LAND-Mask denoiser trained once for this folder."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # land_tiny, imported by name like synth_fakes

from land_tiny import phantom_cond, tiny_cfg  # noqa: E402

from lungsynth.engine import Trainer  # noqa: E402
from lungsynth.methods import land  # noqa: E402


def _mask_items(n, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        lo = torch.randint(4, 20, (3,), generator=g).tolist()
        grid = land.condition_grid(phantom_cond(size, lo, 8), "mask")[0]
        items.append({"z": (2.0 * grid - 1.0).expand(4, -1, -1, -1).clone(), "grid": grid})
    return items


@pytest.fixture(scope="module")
def trained_mask_run(tmp_path_factory):
    """A tiny LAND-Mask denoiser trained on latents that equal 2 * grid - 1 (the engine writes final.pt)."""
    cfg = tiny_cfg(32)
    spec = land.denoiser_spec(cfg, "mask", 4)
    torch.manual_seed(0)
    task = land.LandTask(spec, cfg.land.min_snr_gamma)
    run = tmp_path_factory.mktemp("land_mask")
    Trainer(run, max_steps=100, lr=3e-3, batch_size=2, progress=False, seed=0).fit(task, _mask_items(24))
    return cfg, run
