"""Tiny LAND configurations and phantom condition volumes shared by the chapter 03 tests.

Tiny sizes throughout: 16^3 or 32^3 "images", 3-level U-Nets, synthetic latents (no prepared data,
no trained autoencoders). Importable by name: ``conftest.py`` puts this folder on ``sys.path``.
"""

import torch

from lungsynth.config import get_config

TINY = {"land.unet_channels": "16,16,16", "land.attention_levels": "False,True,True", "land.context_dim": 16,
        "land.token_grid": 2, "land.token_hidden": 8, "land.num_res_blocks": 1, "land.ddpm_steps": 8,
        "land.ddim_steps": 4, "autoencoders.vae3d_channels": "8,8,8", "autoencoders.maskvae_channels": "8,8,8"}


def tiny_cfg(size=32, **extra):
    return get_config("smoke", {**TINY, "data.size_3d": size, **extra})


def phantom_cond(size=32, lo=(10, 10, 10), side=6, texture=5):
    c = torch.zeros(1, 1, size, size, size)
    m = size // 8
    c[..., m:size - m, m:size - m, m:size - m] = 0.1
    c[..., lo[0]:lo[0] + side, lo[1]:lo[1] + side, lo[2]:lo[2] + side] = texture / 5
    return c
