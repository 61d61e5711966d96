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


def test_all_times_the_data_and_quality_stages_around_the_chapters(tiny_course, monkeypatch):
    # the stages run as child commands; cheap ones stand in for data preparation and the gates
    monkeypatch.setattr(course, "STAGES", {"data": ("course", "list"), "quality": ("course", "list")})
    rows = course.run_all("smoke")
    assert [r["chapter"] for r in rows] == ["data", "00", "01", "quality"]
    logged = course.last_run("smoke")
    assert [r["chapter"] for r in logged] == ["data", "00", "01", "quality"]
    assert all(r["status"] == "ok" and float(r["seconds"]) > 0 for r in logged)
    course.run_all("smoke")  # a second run: the chapters are skipped, the log starts again at its data row
    assert [r["chapter"] for r in course.last_run("smoke")] == ["data", "quality"]
    monkeypatch.setattr(course, "STAGES", {"data": ("data", "no-such-verb"), "quality": ("course", "list")})
    with pytest.raises(RuntimeError, match="stage data failed"):
        course.run_all("smoke")
    assert course.last_run("smoke")[-1]["status"].startswith("failed with exit code")


def test_report_section_from_the_log_and_the_quality_json(tiny_course, monkeypatch, tmp_path):
    monkeypatch.setattr(course, "STAGES", {"data": ("course", "list"), "quality": ("course", "list")})
    course.run_all("smoke")
    gates = [{"chapter": "02", "name": "vae3d body MAE", "value": 41.23456, "baseline": 62.0,
              "baseline_name": "linear x4", "threshold": "<= 0.6x baseline", "status": "fail", "n": 30},
             {"chapter": "01", "name": "in-lung share", "value": 0.995, "baseline": None, "threshold": ">= 0.95",
              "status": "pass", "n": 408}]
    (paths.runs_dir("smoke") / "quality.json").write_text(json.dumps({"source": "phantom", "gates": gates}))
    section = course.measured_section("smoke", {"03 — LAND": "docs/course/03_land.png"})
    assert "data phantom" in section and "1 fail, 1 pass" in section and "The whole course took" in section
    assert "| 02 | vae3d body MAE | 41.2 | 62 (linear x4) | <= 0.6x baseline | fail | 30 |" in section
    assert "| 00 — Test chapter |" in section and "| data |" in section and "| quality |" in section
    assert "![03 — LAND](docs/course/03_land.png)" in section
    course.run_course("smoke", only="01", force=True)  # a rerun replaces the chapter's row, in course order
    assert [r["chapter"] for r in course.last_run("smoke")] == ["data", "00", "01", "quality"]
    # a chapter that failed or never ran is named, not summed
    log = paths.runs_dir("smoke") / "course" / "course_log.csv"
    log.write_text("\n".join(line for line in log.read_text().splitlines() if ",00," not in line) + "\n")
    assert "chapters 00 are not in this run" in course.measured_section("smoke")
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Measured\n{course.README_START}\nstale text\n{course.README_END}\n\n## Next\n")
    course.write_readme_section(readme, section)
    text = readme.read_text()
    assert "stale text" not in text and "vae3d body MAE" in text and text.endswith("\n## Next\n")
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="markers"):
        course.write_readme_section(readme, section)


def test_figures_come_from_the_tagged_cell_downscaled(tiny_course, tmp_path):
    import base64
    import io

    from PIL import Image

    course.run_course("smoke")
    executed = paths.runs_dir("smoke") / "course" / "01_second.ipynb"
    nb = nbformat.read(executed, as_version=4)
    buffer = io.BytesIO()
    Image.new("RGB", (1800, 600), (200, 10, 10)).save(buffer, format="PNG")
    png = base64.b64encode(buffer.getvalue()).decode()
    untagged = nbformat.v4.new_code_cell("plot()")
    untagged.outputs = [nbformat.v4.new_output("display_data", data={"image/png": png})]
    tagged = nbformat.v4.new_code_cell("plot()", metadata={"tags": [course.FIGURE_TAG]})
    tagged.outputs = [nbformat.v4.new_output("stream", text="x"),
                      nbformat.v4.new_output("display_data", data={"image/png": png})]
    nb.cells += [untagged, tagged]
    nbformat.write(nb, executed)
    found = course.export_figures("smoke", tmp_path / "docs", max_side=300)
    assert list(found) == ["01 — Test chapter"]
    image = Image.open(tmp_path / "docs" / "01_second.png")
    assert image.size == (300, 100)
    assert not (tmp_path / "docs" / "00_first.png").exists()  # no tagged cell, no figure
