"""pytest setup for the chapter notebooks (``make test`` runs them with nbval beside the library's tests).

Keeps what every executed cell printed, one JSON Lines file per chapter under ``$LUNGSYNTH_HOME/notebook_outputs``,
so that notebooks/test_notebook_outputs.py can check the numbers the chapters show (that every printed interval
contains its estimate, that no table row is a constant). Not needed to run a chapter; learners can ignore it.

Under ``make test`` (``pytest -n 2``) one worker runs the library's tests and then the chapters of
``BESIDE_THE_LIBRARY``, the other every other chapter in order and then the tests of what they trained. All
chapters work in one folder of the session's home, ``notebooks``, as when they run one after the other; a chapter
waits until the chapters it needs are done. Each chapter's kernel starts with the CPU threads the other worker
leaves free: one while both work, both once one is done.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

OUTPUTS_FOLDER = "notebook_outputs"
NOTEBOOKS = "notebooks"  # this folder, relative to the repository (the node ids' root)
# Chapters the library's worker runs after its own tests, which ended ten minutes before the chapters did
# (10.5-11 of 20.6 minutes, measured), with the chapters each needs done first. Moving 06, 07 and 10 here ended the
# library's worker at 14.7 minutes and the chapters' at 19.5; 05 and 11 balance the two.
BESIDE_THE_LIBRARY: dict[str, tuple[str, ...]] = {
    "05_hr_ldm": ("02_autoencoders",),  # the vae3d
    "06_lung_ddpm": ("01_data",),  # pixel space: the prepared volumes only
    "07_text2img": ("02_autoencoders",),  # the 2D KL-VAE
    "10_downstream_segmentation": ("06_lung_ddpm",),  # Lung-DDPM's volumes
    "11_downstream_classification": ("05_hr_ldm",),  # HR-LDM's nodules
}
# The other worker's chapters that need one of those: the leaderboard ranks every method trained when it runs.
NEEDS_FROM_BESIDE: dict[str, tuple[str, ...]] = {"09_evaluation": ("05_hr_ldm", "06_lung_ddpm", "07_text2img")}
WAIT_LIMIT_S = 45 * 60  # far beyond any chapter's smoke time; reached only when the other worker died

_started: set[str] = set()  # chapters whose file this session has begun (an older run's file is replaced)
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ... under `pytest -n N`
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_SHARED_THREADS = os.environ.get("LUNGSYNTH_TEST_THREADS") == "shared"  # set by tests/conftest.py in workers
_WORKER_HOME = os.environ.get("LUNGSYNTH_HOME")  # the worker's own folder (tests/conftest.py), restored after a chapter
_collected: set[str] = set()  # the chapters this session runs
_kernels_started: set[Path] = set()
_waits_failed: dict[Path, str] = {}  # chapter -> why its wait for other chapters failed


def _session_home() -> Path | None:
    """The session's home, whose folders gw0, gw1, ... are the workers' homes (tests/conftest.py)."""
    return Path(_WORKER_HOME).parent if _WORKER_HOME and _WORKER and Path(_WORKER_HOME).name == _WORKER else None


def _run_folder(config) -> Path | None:
    """This run's markers (workers finished, chapters done): one folder per run, so a kept home's old markers
    from an earlier run are never read."""
    session = _session_home()
    uid = getattr(config, "workerinput", {}).get("testrunuid")
    if session is None or uid is None:
        return None
    folder = session / f"run-{uid}"
    folder.mkdir(exist_ok=True)
    return folder


def notebooks_home() -> Path | None:
    """Where every chapter of a ``pytest -n N`` session works, whichever worker runs it."""
    session = _session_home()
    return session / NOTEBOOKS if session else None


def _threads_free(config) -> int:
    """The cores divided among the workers still running (each leaves ``finished-<worker>`` on finishing)."""
    run = _run_folder(config)
    finished = {f.name for f in run.glob("finished-gw*")} - {f"finished-{_WORKER}"} if run else set()
    return max(1, (os.cpu_count() or 1) // max(1, _WORKERS - len(finished)))


def pytest_xdist_make_scheduler(config, log):
    """``make test`` (``pytest -n 2``): one worker runs the library's tests and then the chapters of
    ``BESIDE_THE_LIBRARY``, the other every other chapter in order and then the tests of what they trained.

    Written here because the chapters must keep their order, and pytest-xdist's own grouping (``--dist
    loadgroup``) does not take effect under pytest 9 (it renames a node id attribute pytest 9 no longer reads);
    this is its scope scheduler with two scopes. Within a scope the tests keep their collected order, so the
    library's tests come before its chapters."""
    from xdist.scheduler import LoadScopeScheduling

    class NotebooksBesideLibrary(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_scope(nodeid)

    return NotebooksBesideLibrary(config, log)


def worker_scope(nodeid: str) -> str:
    """``"notebooks"`` for the chapters run in order (and the tests of what they trained), else ``"library"``."""
    beside = tuple(f"{NOTEBOOKS}/{stem}.ipynb" for stem in BESIDE_THE_LIBRARY)
    return NOTEBOOKS if nodeid.startswith(f"{NOTEBOOKS}/") and not nodeid.startswith(beside) else "library"


def pytest_collection_modifyitems(session, config, items) -> None:
    _collected.update(item.path.stem for item in items if item.path.suffix == ".ipynb")


def _needs(item) -> set[str]:
    """The chapters ``item`` waits for: those ``BESIDE_THE_LIBRARY`` and ``NEEDS_FROM_BESIDE`` name, every chapter
    for the tests of what the chapters trained; only those this session runs."""
    if item.get_closest_marker("after_notebooks"):
        needed = set(_collected)
    else:
        stem = item.path.stem
        needed = set(BESIDE_THE_LIBRARY.get(stem, ())) | set(NEEDS_FROM_BESIDE.get(stem, ()))
    return needed & _collected


def _wait_for(item, done: Path) -> None:
    missing = sorted(s for s in _needs(item) if not (done / s).exists())
    deadline = time.monotonic() + WAIT_LIMIT_S
    while missing:
        if time.monotonic() > deadline:
            pytest.fail(f"{item.nodeid} waited {WAIT_LIMIT_S // 60} minutes for {', '.join(missing)}, run by the "
                        f"other worker; its failure, if any, is reported above", pytrace=False)
        time.sleep(2)
        missing = [s for s in missing if not (done / s).exists()]


@pytest.hookimpl(tryfirst=True)  # before the runner's setup, in which nbval starts the notebook's kernel
def pytest_runtest_setup(item) -> None:
    """Under ``pytest -n N``: the chapters' shared folder as the home, the chapters ``item`` needs done, and a
    chapter's kernel started with the threads free now."""
    home = notebooks_home()
    if home is None:
        return
    home.mkdir(exist_ok=True)
    os.environ["LUNGSYNTH_HOME"] = str(home)
    first_cell = item.path.suffix == ".ipynb" and item.path not in _kernels_started
    _kernels_started.add(item.path)
    if item.path in _waits_failed:  # its chapter's wait failed: the later cells fail at once, not after another wait
        pytest.fail(_waits_failed[item.path], pytrace=False)
    if first_cell or item.get_closest_marker("after_notebooks"):
        try:
            _wait_for(item, _run_folder(item.config))
        except pytest.fail.Exception as failed:
            if first_cell:
                _waits_failed[item.path] = str(failed)
            raise
    if first_cell and _SHARED_THREADS:
        os.environ["OMP_NUM_THREADS"] = str(_threads_free(item.config))


def pytest_sessionfinish(session, exitstatus) -> None:
    run = _run_folder(session.config)
    if run is not None:
        (run / f"finished-{_WORKER}").touch()


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


def _keep_outputs(item) -> None:
    """The cell's printed text and tables, appended to its chapter's file under the home."""
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


@pytest.hookimpl(trylast=True)  # after the runner's teardown, which stops a chapter's kernel after its last cell
def pytest_runtest_teardown(item, nextitem) -> None:
    """Keeps the cell's outputs; under ``pytest -n N`` a chapter's last cell marks the chapter done, and the
    worker's own home comes back."""
    _keep_outputs(item)
    if notebooks_home() is None:
        return
    if item.path.suffix == ".ipynb" and (nextitem is None or nextitem.path != item.path):
        (_run_folder(item.config) / item.path.stem).touch()
    if _WORKER_HOME:
        os.environ["LUNGSYNTH_HOME"] = _WORKER_HOME
