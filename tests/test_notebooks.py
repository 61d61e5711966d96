"""The notebook conventions of DESIGN.md, enforced on every chapter."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from lungsynth import paths
from lungsynth.course import chapters

CHAPTERS = chapters(paths.notebooks_dir())
MAX_CODE_LINES = 30


def _cells(chapter):
    return json.loads(chapter.path.read_text())["cells"]


def _text(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def test_chapters_are_numbered_without_gaps():
    numbers = [int(c.number) for c in CHAPTERS]
    assert numbers == list(range(len(numbers))), f"chapter numbers have gaps: {numbers}"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda c: c.name)
def test_opens_with_title_lessons_and_needs(chapter):
    first = _cells(chapter)[0]
    assert first["cell_type"] == "markdown"
    text = _text(first)
    assert re.match(rf"# {chapter.number} — \S", text), "first cell must be the title '# NN — Title'"
    assert "What you will learn" in text and "Needs" in text


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda c: c.name)
def test_has_a_papermill_parameters_cell(chapter):
    tagged = [c for c in _cells(chapter) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one code cell tagged 'parameters'"
    assert "PROFILE" in _text(tagged[0]) and "OVERRIDES" in _text(tagged[0])


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda c: c.name)
def test_links_to_the_next_chapter(chapter):
    index = CHAPTERS.index(chapter)
    last = _text([c for c in _cells(chapter) if c["cell_type"] == "markdown"][-1])
    if index + 1 < len(CHAPTERS):
        nxt = CHAPTERS[index + 1]
        assert f"({nxt.path.name})" in last and "Next" in last, f"last cell must link to {nxt.path.name}"
    assert "Summary" in last or "summary" in last


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda c: c.name)
def test_code_cells_are_short(chapter):
    for i, cell in enumerate(_cells(chapter)):
        if cell["cell_type"] == "code":
            lines = len(_text(cell).splitlines())
            assert lines <= MAX_CODE_LINES, f"cell {i} has {lines} lines; move the code into lungsynth/"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda c: c.name)
def test_outputs_stripped_or_nbval_consistent(chapter):
    for i, cell in enumerate(_cells(chapter)):
        if cell["cell_type"] == "code" and cell.get("outputs"):
            assert cell.get("execution_count") is not None, f"cell {i} keeps outputs without an execution count"


@pytest.mark.parametrize("chapter", [c for c in CHAPTERS if int(c.number) >= 1], ids=lambda c: c.name)
def test_figures_say_which_data_they_show(chapter):
    """Every chapter with data labels its figures with the source (phantom or LIDC-IDRI) before the first one."""
    code = [_text(c) for c in _cells(chapter) if c["cell_type"] == "code"]
    assert any("label_figures(data_source(" in src for src in code), f"{chapter.name}: no label_figures(data_source(...))"
    labelled = [i for i, src in enumerate(code) if "label_figures(" in src]
    draws = re.compile(r"\b(plt\.\w+|show_\w+|image_grid|value_counts_grid)\(")
    plotting = [i for i, src in enumerate(code) if draws.search(src)]
    assert not plotting or labelled[0] <= plotting[0], f"{chapter.name}: a figure comes before the source label"


# Statements an evaluation review found contradicted by the chapters' own output (issue: numbers the chapters can
# stand behind). Each was rewritten to read the computed table or to say what cannot contradict it.
CONTRADICTED = {
    "01": ["up to four radiologists"],  # the printed clusters have 5-8 readers
    "05": ["a sixty-fourth"],  # 32^3 / 64^3 is an eighth
    "07": ["trades diversity for fidelity"],  # its table shows FID worsening and diversity flat
    "08": ["loses a little quality"],  # its table shows neither
    "10": ["9/3 scans", "9 / 3 scans"],  # the output counts 8/4
}


@pytest.mark.parametrize("chapter", [c for c in CHAPTERS if c.number in CONTRADICTED], ids=lambda c: c.name)
def test_prose_the_output_contradicted_stays_gone(chapter):
    prose = " ".join(_text(c) for c in _cells(chapter) if c["cell_type"] == "markdown").lower()
    assert not [s for s in CONTRADICTED[chapter.number] if s in prose]


def _notebooks_conftest():
    """notebooks/conftest.py, which places the chapters under ``make test`` (two workers)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("notebooks_placement", paths.notebooks_dir() / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_test_runs_a_chapter_only_after_the_chapters_it_waits_for_and_none_waits_in_a_circle():
    placement = _notebooks_conftest()
    stems = {c.path.stem: int(c.number) for c in CHAPTERS}
    waits = {**placement.BESIDE_THE_LIBRARY, **placement.NEEDS_FROM_BESIDE}
    for chapter, needed in waits.items():
        assert chapter in stems and set(needed) <= set(stems), (chapter, needed)
        # each worker runs its chapters in number order, so waiting only on lower numbers cannot deadlock
        assert all(stems[n] < stems[chapter] for n in needed), (chapter, needed)
    for chapter, needed in placement.NEEDS_FROM_BESIDE.items():
        assert chapter not in placement.BESIDE_THE_LIBRARY and set(needed) <= set(placement.BESIDE_THE_LIBRARY)
    # the chapters' worker gets the chapters not beside the library, in order, and the tests of what they trained
    scope = placement.worker_scope
    assert scope("notebooks/03_land.ipynb::Cell 4") == scope("notebooks/test_quality_report.py::test_x") == "notebooks"
    assert {scope(f"notebooks/{stem}.ipynb::Cell 1") for stem in placement.BESIDE_THE_LIBRARY} == {"library"}
    assert scope("tests/test_paths.py::test_home_override") == "library"


def _item(nodeid: str, after_notebooks: bool = False):
    """A collected test or notebook cell, as the placement hooks read it."""

    return SimpleNamespace(nodeid=nodeid, path=Path(nodeid.split("::")[0]), config=None,
                           get_closest_marker=lambda name: (name == "after_notebooks" and after_notebooks) or None)


def test_a_chapter_whose_wait_failed_fails_its_later_cells_at_once(tmp_path, monkeypatch):
    """When the chapters a notebook needs never finish, its first cell fails after the wait and every later cell
    fails at once with the same reason, rather than waiting again for each cell."""
    placement = _notebooks_conftest()
    monkeypatch.setattr(placement, "WAIT_LIMIT_S", 0)
    monkeypatch.setattr(placement, "notebooks_home", lambda: tmp_path / "notebooks")
    monkeypatch.setattr(placement, "_run_folder", lambda config: tmp_path)
    monkeypatch.setenv("LUNGSYNTH_HOME", str(tmp_path))
    chapter, needed = next(iter(placement.BESIDE_THE_LIBRARY.items()))
    placement._collected.update({chapter, *needed})
    waits = []
    real_wait = placement._wait_for
    monkeypatch.setattr(placement, "_wait_for", lambda item, done: (waits.append(item), real_wait(item, done)))
    cell = _item(f"notebooks/{chapter}.ipynb::Cell 0")
    with pytest.raises(pytest.fail.Exception, match="waited"):
        placement.pytest_runtest_setup(cell)
    with pytest.raises(pytest.fail.Exception, match="waited"):
        placement.pytest_runtest_setup(cell)
    assert len(waits) == 1


def test_tests_of_what_the_chapters_trained_run_last_and_only_from_the_notebooks_folder(request):
    """tests/conftest.py moves ``after_notebooks`` tests to the end, and refuses one outside ``notebooks/`` (the
    worker that runs the chapters would never run it after them)."""
    here = Path(__file__).resolve().parent / "conftest.py"
    (tests_conftest,) = [p for p in request.config.pluginmanager.get_plugins()
                         if Path(getattr(p, "__file__", "") or "").resolve() == here]
    later = _item("notebooks/test_quality_report.py::test_report", True)
    items = [later, _item("tests/test_paths.py::test_home", False), _item("notebooks/03_land.ipynb::Cell 0", False)]
    tests_conftest.pytest_collection_modifyitems(None, None, items)
    assert items[-1] is later and len(items) == 3
    with pytest.raises(pytest.UsageError, match="move tests/test_x.py::test_y"):
        tests_conftest.pytest_collection_modifyitems(None, None, [_item("tests/test_x.py::test_y", True)])
