"""Shared fixtures of the Lung-DDPM tests: the toy volumes and both variants trained briefly (once per session)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # lung_ddpm_toys, imported by name

from lung_ddpm_toys import tiny_cfg, toy_volume  # noqa: E402

from lungsynth.methods import lung_ddpm as ld  # noqa: E402


@pytest.fixture(scope="session")
def toy_data():
    return [toy_volume(i) for i in range(3)]


@pytest.fixture(scope="session")
def trained(tmp_path_factory, toy_data):
    """Both variants trained for 4 steps on the toy volumes (shared by the tests below)."""
    cfg = tiny_cfg()
    runs = {}
    for variant in ld.VARIANTS:
        runs[variant] = ld.train(cfg, variant, tmp_path_factory.mktemp(variant), dataset=toy_data, progress=False)
    return cfg, runs
