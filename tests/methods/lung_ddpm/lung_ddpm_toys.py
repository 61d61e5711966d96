"""Toy data for the Lung-DDPM tests: a tiny config and 16^3 toy chests (imported by name; conftest.py puts
this folder on sys.path)."""

from __future__ import annotations

import torch

from lungsynth.config import get_config
from lungsynth.methods import lung_ddpm as ld

S = 16


def tiny_cfg(**extra):
    overrides = {"data.size_ddpm": S, "lung_ddpm.unet_channels": "8,16", "lung_ddpm.attention_at": "1",
                 "lung_ddpm.train_steps": 3, "lung_ddpm.ema_start": 2, "lung_ddpm.ema_every": 1,
                 "lung_ddpm.sample_steps": 3, "engine.checkpoint_every": 2, "engine.log_every": 1,
                 "evaluation.feature_network": "slicenet2d-2.5d"}
    overrides.update(extra)
    return get_config("smoke", overrides)


def toy_volume(seed: int) -> dict:
    """A 16^3 toy chest: body disc, two lungs, one nodule; ct in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    z, y, x = torch.meshgrid(*(torch.arange(S, dtype=torch.float32),) * 3, indexing="ij")
    body = ((y - 7.5) ** 2 / 49 + (x - 7.5) ** 2 / 49) <= 1
    lung = ((((y - 7.5) ** 2 + (x - 4.5) ** 2) <= 7) | (((y - 7.5) ** 2 + (x - 10.5) ** 2) <= 7)) & (z > 2) & (z < 13)
    label = (((z - 8) ** 2 + (y - 7.5) ** 2 + (x - 4.5 - seed % 2) ** 2) <= 2).to(torch.uint8)
    ct = torch.where(body, torch.tensor(0.7), torch.tensor(0.0))
    ct = torch.where(lung, torch.tensor(0.15), ct)
    ct = torch.where(label > 0, torch.tensor(0.75), ct)
    ct = (ct + 0.02 * torch.randn(ct.shape, generator=g)).clamp(0, 1)
    return {"ct": ct[None], "lung": lung.float()[None], "label": label.float()[None], "scan_id": f"toy{seed}"}


def toy_batch(toy_data, n=2):
    ct = torch.stack([d["ct"] for d in toy_data[:n]])
    layout = torch.stack([ld.make_layout(d["lung"][None], d["label"][None])[0] for d in toy_data[:n]])
    return ct, layout
