"""``lungsynth quality --profile smoke`` on what the smoke notebooks trained (``make test`` runs it after them).

It lives beside the notebooks because it reads what they trained: under ``make test`` the worker that runs the
notebooks runs every test in this folder after them, in the same LUNGSYNTH_HOME.
"""

import json
import re

import pytest

from lungsynth.gates import STATUSES
from lungsynth.quality import REPORT_JSON, REPORT_MD


@pytest.mark.after_notebooks
def test_report_of_what_the_smoke_notebooks_trained(tmp_path):
    """After the notebooks ran (make test), every chapter with gates has rows, each well formed; smoke gates
    may fail, and the report says so. Run alone, it reports whatever this home holds (maybe nothing trained)."""
    from lungsynth.config import get_config
    from lungsynth.quality import chapter_gates, quality

    cfg = get_config("smoke")
    gates, files = quality(cfg, out_dir=tmp_path, progress=False)
    assert {g.chapter for g in gates} >= {"01", "02"}
    for g in gates:
        assert g.status in STATUSES and g.name
        if g.status in ("pass", "fail"):
            assert g.value is not None and g.threshold and g.n >= g.n_needed
        if g.status == "not trained":
            assert "`lungsynth " in g.detail
    md = (tmp_path / REPORT_MD).read_text()
    table_rows = [line for line in md.splitlines() if line.startswith("| ")][1:]  # without the header
    assert len(table_rows) == len(gates) == len(json.loads((tmp_path / REPORT_JSON).read_text())["gates"])
    assert re.match(r"# Quality gates \(smoke, (phantom|LIDC-IDRI|mixed|unknown source)\)", md)
    assert set(chapter_gates()) >= {"01", "02", "03", "04", "05", "06", "07", "10", "11"}
