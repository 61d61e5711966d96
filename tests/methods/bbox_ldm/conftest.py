"""Shared fixtures of the bbox-LDM tests: a tiny config, a synthetic training split and an untrained VQ-VAE.

Everything runs on small synthetic slices, so no prepared data is needed.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lungsynth.config import get_config

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bbox_fakes beside this file, imported by name

from bbox_fakes import S, lung_masks  # noqa: E402


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory):
    """A tiny config, synthetic training split and an untrained VQ-VAE."""
    from lungsynth.autoencoders import build_autoencoder

    cfg = get_config("smoke", {"data.size_2d": S, "bbox_ldm.unet_channels": "16,16,32", "bbox_ldm.batch_size": 4,
                               "bbox_ldm.train_steps": 2, "bbox_ldm.ddim_steps": 2,
                               "autoencoders.vqvae2d_channels": "8,8", "engine.checkpoint_every": 0})
    rng = np.random.default_rng(0)
    n = 6
    lungs = lung_masks(n)
    boxes = np.stack([rng.integers(4, 20, n), rng.integers(4, 20, n), rng.integers(2, 8, n)], axis=1)
    hu = np.where(lungs, -850.0, 40.0)
    data = {"images": torch.from_numpy(((hu + 1000) / 3500)[:, None].astype(np.float32)), "boxes": boxes,
            "lungs": lungs, "attributes": rng.integers(1, 6, (n, 5)), "nodule_ids": list(map(str, range(n))),
            "hu_clip": (-1000.0, 2500.0)}
    torch.manual_seed(0)
    ae = build_autoencoder("vqvae2d", cfg).eval()
    return cfg, data, ae, tmp_path_factory.mktemp("bbox_runs")
