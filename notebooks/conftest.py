"""pytest setup for the chapter notebooks (``make test`` runs them with nbval beside the library's tests).

Keeps what every executed cell printed, one JSON Lines file per chapter under ``$LUNGSYNTH_HOME/notebook_outputs``,
so that notebooks/test_notebook_outputs.py can check the numbers the chapters show (that every printed interval
contains its estimate, that no table row is a constant). Not needed to run a chapter; learners can ignore it.

Under ``make test`` (two pytest-xdist workers, tests/conftest.py) it also starts each chapter's kernel with the
CPU threads the other worker leaves free: one while the library's tests run beside it, both once they are done.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

OUTPUTS_FOLDER = "notebook_outputs"
_started: set[str] = set()  # chapters whose file this session has begun (an older run's file is replaced)
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ... under `pytest -n N`
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_SHARED_THREADS = os.environ.get("LUNGSYNTH_TEST_THREADS") == "shared"  # set by tests/conftest.py in workers
_kernels_started: set[Path] = set()


def _session_home() -> Path | None:
    """The session's home, whose folders gw0, gw1, ... are the workers' homes (tests/conftest.py)."""
    home = os.environ.get("LUNGSYNTH_HOME")
    return Path(home).parent if home and _WORKER and Path(home).name == _WORKER else None


def _threads_free() -> int:
    """The cores divided among the workers still running (each leaves ``finished-<worker>`` on finishing)."""
    session = _session_home()
    finished = {f.name for f in session.glob("finished-gw*")} - {f"finished-{_WORKER}"} if session else set()
    return max(1, (os.cpu_count() or 1) // max(1, _WORKERS - len(finished)))


@pytest.hookimpl(tryfirst=True)  # before the runner's setup, in which nbval starts the notebook's kernel
def pytest_runtest_setup(item) -> None:
    """A chapter's kernel starts with the threads free now: the 2D autoencoders of chapter 02 train 1.6x faster
    on two threads than on one (379 s against 232 s, measured under make test), most other cells about alike."""
    if _SHARED_THREADS and item.path.suffix == ".ipynb" and item.path not in _kernels_started:
        _kernels_started.add(item.path)
        os.environ["OMP_NUM_THREADS"] = str(_threads_free())


def pytest_sessionfinish(session, exitstatus) -> None:
    home = _session_home()
    if home is not None:
        (home / f"finished-{_WORKER}").touch()


def _texts(outputs: list[dict]) -> dict[str, list[str]]:
    """The printed text and the HTML tables of one cell's nbval outputs."""
    texts, html = [], []
    for out in outputs:
        data = out.get("data", {})
        text = out.get("text", data.get("text/plain", ""))
        texts.append("".join(text) if isinstance(text, list) else str(text))
        if "text/html" in data:
            value = data["text/html"]
            html.append("".join(value) if isinstance(value, list) else str(value))
    return {"text": texts, "html": html}


def pytest_runtest_teardown(item, nextitem) -> None:
    outputs = getattr(item, "test_outputs", None)  # set by nbval once the cell ran
    home = os.environ.get("LUNGSYNTH_HOME")
    if outputs is None or not home:
        return
    chapter = Path(str(item.fspath)).stem
    path = Path(home) / OUTPUTS_FOLDER / f"{chapter}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a" if chapter in _started else "w") as f:  # one line a cell
        f.write(json.dumps({"cell": int(getattr(item, "cell_num", -1)), **_texts(outputs)}) + "\n")
    _started.add(chapter)
