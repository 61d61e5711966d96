"""Shared fixtures of the chapter 05 (HR-LDM) tests.

Tiny sizes throughout: an untrained 3D KL-VAE from the course factory, synthetic 16^3 nodule crops
(spheres of three HU levels for the three subtypes) and a 48^3 synthetic volume with two lungs.
The fixtures are built once for this folder (package scope), as they were for the one test module.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lungsynth.config import get_config
from lungsynth.methods import hr_ldm

TINY = {"data.crop_size": 16, "hr_ldm.unet_channels": (16, 16), "hr_ldm.attention_levels": (False, True), "hr_ldm.num_res_blocks": 1,
        "hr_ldm.context_dim": 16, "hr_ldm.hist_hidden": 16, "hr_ldm.train_steps": 3, "hr_ldm.batch_size": 2,
        "hr_ldm.ddim_steps": 4, "hr_ldm.n_cache": 0, "autoencoders.vae3d_channels": (8, 16, 16),
        "engine.checkpoint_every": 0, "engine.log_every": 1, "hr_ldm.lung_erosion_mm": 1.0}


def _crop(side: int, radius: float, hu_in: float, subtype: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    g = np.indices((side,) * 3) - (side - 1) / 2
    nod = np.sqrt((g**2).sum(0)) <= radius
    hu = rng.normal(-850, 30, (side,) * 3)
    hu[nod] = rng.normal(hu_in, 40, int(nod.sum()))
    core = nod & (hu > -300)
    unit = np.clip((hu + 1000) / 1400, 0, 1).astype(np.float32)
    return {"ct": torch.from_numpy(unit)[None], "hrmask": torch.from_numpy(np.stack([nod, core, nod & ~core])).float(),
            "mask": torch.from_numpy(nod)[None].float(), "subtype_id": subtype, "diameter_mm": 2.0 * radius,
            "nodule_id": f"n{seed}", "scan_id": f"scan{seed // 2}"}


@pytest.fixture(scope="package")
def cfg():
    return get_config("smoke", TINY)


@pytest.fixture(scope="package")
def cfg_1mm():
    """The tiny config on the 48^3 test volume's 1 mm grid, half of the nodules sub-pleural."""
    return get_config("smoke", {**TINY, "data.spacing_3d_mm": 1.0, "hr_ldm.subpleural_share": 0.5})


@pytest.fixture(scope="package")
def vae(cfg):
    from lungsynth.autoencoders import build_autoencoder

    torch.manual_seed(0)
    return build_autoencoder("vae3d", cfg).eval().requires_grad_(False)


@pytest.fixture(scope="package")
def crops():
    return [_crop(16, 2.5 + (i % 2), (-50.0, -350.0, -650.0)[i % 3], i % 3, i) for i in range(6)]


@pytest.fixture(scope="package")
def volume():
    g = np.indices((48,) * 3)
    lung = np.zeros((48,) * 3, bool)
    for cx in (14, 34):
        lung |= ((g[0] - 24) ** 2 / 20**2 + (g[1] - 24) ** 2 / 14**2 + (g[2] - cx) ** 2 / 9**2) < 1
    ct = np.where(lung, -850.0, 40.0).astype(np.float32)
    return ct, lung


@pytest.fixture(scope="package")
def runs(cfg, vae, crops, tmp_path_factory):
    root = tmp_path_factory.mktemp("hr_ldm")
    with_hist = hr_ldm.train(cfg, True, root / "hist", vae=vae, crops=crops, progress=False)
    without = hr_ldm.train(cfg, False, root / "nohist", vae=vae, crops=crops, progress=False)
    return with_hist, without
