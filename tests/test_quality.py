"""``lungsynth quality``: the report's form (the report of what the smoke notebooks trained is checked in notebooks/test_quality_report.py)."""

import json
import re

import pytest

from lungsynth.gates import judge, not_trained
from lungsynth.quality import report_markdown, write_report


def _table_rows(md: str) -> list[list[str]]:
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in r.strip("|").split("|")] for r in rows[1:]]  # without the header


def test_report_rows_counts_and_insufficient_n(tmp_path):
    gates = [judge("01", "in lung", 0.97, n=12, at_least=0.95),
             judge("02", "vae3d: body MAE", 40.0, n=2, n_needed=5, factor=0.6, baseline=50.0, baseline_name="linear x4"),
             not_trained("02", "vae2d autoencoder", "lungsynth autoencoder train --kind vae2d")]
    files = write_report(gates, tmp_path, "smoke", "phantom", chapters=["01", "02", "03"])
    md = files["md"].read_text()
    assert md.startswith("# Quality gates (smoke, phantom)")
    assert "1 pass · 1 insufficient N · 1 not trained" in md
    rows = _table_rows(md)
    assert [r[5] for r in rows] == ["**pass**", "insufficient N (2, needed 5)", "not trained"]
    assert rows[1][3] == "50 (linear x4)" and "Chapters without gates yet: 03." in md
    data = json.loads(files["json"].read_text())
    assert [g["status"] for g in data["gates"]] == ["pass", "insufficient N", "not trained"]
    assert data["gates"][0]["passed"] is True and data["source"] == "phantom"
    assert report_markdown([], "smoke", "phantom").count("no gates") == 1


def test_report_accounts_for_every_course_chapter():
    """Chapters 08-09 have no gates (yet): the report must still name them, not leave them out."""
    from lungsynth import paths
    from lungsynth.quality import chapter_gates, course_chapters

    numbers = course_chapters()
    notebooks = [n for n, _, _ in paths.chapter_notebooks() if n != "00"]
    assert set(notebooks) <= set(numbers) and set(chapter_gates()) <= set(numbers) and "00" not in numbers
    md = report_markdown([judge("01", "in lung", 0.97, n=12, at_least=0.95)], "smoke", "phantom", numbers)
    missing = re.search(r"Chapters without gates yet: (.*)\.", md).group(1).split(", ")
    assert {"08", "09", "10", "11"} <= set(missing) and "01" not in missing
