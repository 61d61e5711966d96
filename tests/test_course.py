"""The papermill course runner on a tiny two-chapter course in a temporary folder."""

import csv
import json

import nbformat
import pytest

from lungsynth import course, paths


def _notebook(path, code):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell("PROFILE = None\nOVERRIDES = {}")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {path.stem[:2]} — Test chapter"), params,
                nbformat.v4.new_code_cell(code)]
    nbformat.write(nb, path)


@pytest.fixture()
def tiny_course(tmp_path, monkeypatch):
    books = tmp_path / "notebooks"
    books.mkdir()
    _notebook(books / "00_first.ipynb", "print('profile', PROFILE)")
    _notebook(books / "01_second.ipynb", "x = 1 + 1\nprint(x)")
    monkeypatch.setattr(paths, "notebooks_dir", lambda: books)
    monkeypatch.setenv("LUNGSYNTH_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(course, "library_fingerprint", lambda: "fixed")  # the library may change under us
    return books


def test_chapters_in_order_and_selection(tiny_course):
    found = course.chapters()
    assert [c.number for c in found] == ["00", "01"]
    assert found[0].title() == "00 — Test chapter"
    assert [c.number for c in course.select(found, only="1")] == ["01"]
    assert [c.number for c in course.select(found, start="01")] == ["01"]
    with pytest.raises(ValueError, match="valid chapters: 00, 01"):
        course.select(found, only="07")


def test_run_skip_force_log_and_summary(tiny_course):
    first = course.run_course("smoke")
    assert [r["status"] for r in first] == ["ok", "ok"]
    folder = paths.runs_dir("smoke") / "course"
    executed = nbformat.read(folder / "00_first.ipynb", as_version=4)
    assert "profile smoke" in executed.cells[-1].outputs[0]["text"]  # papermill injected PROFILE
    assert [r["status"] for r in course.run_course("smoke")] == ["skipped", "skipped"]
    assert [r["status"] for r in course.run_course("smoke", only="01", force=True)] == ["ok"]
    rows = list(csv.DictReader((folder / "course_log.csv").open()))
    assert [r["chapter"] for r in rows] == ["00", "01", "01"] and all(float(r["seconds"]) > 0 for r in rows)
    assert "00 — Test chapter" in (folder / "index.html").read_text()


def test_changed_notebook_reruns(tiny_course):
    course.run_course("smoke")
    _notebook(tiny_course / "01_second.ipynb", "print('changed')")
    assert [r["status"] for r in course.run_course("smoke")] == ["skipped", "ok"]


def test_failing_chapter_names_the_cell_and_keeps_partial_output(tiny_course):
    _notebook(tiny_course / "01_second.ipynb", "raise ValueError('bad volume')")
    with pytest.raises(course.ChapterFailed) as info:
        course.run_course("smoke")
    # cell 3: papermill injects the parameters after the tagged cell
    assert info.value.cell == 3 and "ValueError: bad volume" in str(info.value)
    assert "01_second.ipynb" in str(info.value) and info.value.output.is_file()
    state = json.loads((paths.runs_dir("smoke") / "course" / "state.json").read_text())
    assert state["00_first"]["status"] == "ok" and state["01_second"]["status"].startswith("failed in cell 3")


def test_unknown_profile(tiny_course):
    with pytest.raises(ValueError, match="valid profiles"):
        course.run_course("gpu")


def test_library_change_reruns(tiny_course, monkeypatch):
    course.run_course("smoke", only="00")
    monkeypatch.setattr(course, "library_fingerprint", lambda: "changed")
    assert [r["status"] for r in course.run_course("smoke", only="00")] == ["ok"]
