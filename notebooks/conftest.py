"""pytest setup for the chapter notebooks (``make test`` runs them with nbval after the library's tests).

Keeps what every executed cell printed, one JSON Lines file per chapter under ``$LUNGSYNTH_HOME/notebook_outputs``,
so that notebooks/test_notebook_outputs.py can check the numbers the chapters show (that every printed interval
contains its estimate, that no table row is a constant). Not needed to run a chapter; learners can ignore it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

OUTPUTS_FOLDER = "notebook_outputs"
_started: set[str] = set()  # chapters whose file this session has begun (an older run's file is replaced)


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
