"""One small phantom (2 scans) rendered and prepared once per test session, by two data workers (a test checks
that one process writes the same)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

SCANS = (698, 769)  # the two annotated LIDC scans with the fewest slices (65 and 95)
OVERRIDES = {"data.size_3d": 48, "data.spacing_3d_mm": 6.0, "data.size_2d": 32, "data.roi_size": 16,
             "data.crop_size": 16}


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> hex digest)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def small_cfg():
    from lungsynth.config import get_config

    return get_config("smoke", OVERRIDES)


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    from lungsynth.data.phantom import make_phantom

    root = tmp_path_factory.mktemp("phantom_dicom")
    make_phantom(root, list(SCANS), seed=0, noise_hu=20.0, render_matrix=64, verbose=False, workers=2)
    return root


@pytest.fixture(scope="session")
def prepared(phantom_root, small_cfg, tmp_path_factory):
    """(prepared folder, digest of the DICOM tree before prepare)."""
    from lungsynth.data.preprocess import prepare

    before = tree_digest(phantom_root)
    out = tmp_path_factory.mktemp("prepared")
    prepare(phantom_root, out, small_cfg, verbose=False, workers=2)
    return out, before


@pytest.fixture(scope="session")
def phantom_scans() -> tuple[int, ...]:
    return SCANS


@pytest.fixture(scope="session")
def digest():
    return tree_digest
