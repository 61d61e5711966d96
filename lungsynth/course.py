"""Run the course's notebooks in order with papermill: ``lungsynth course list|run``.

Each chapter is executed into ``runs/<profile>/course/NN_slug.ipynb`` (kept even when a
cell fails, so the partial output can be read), with an HTML copy, a CSV log of per-chapter
timings and an ``index.html`` summary. A chapter already run with the same inputs (notebook,
profile, overrides and library source) is skipped unless ``--force``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import html
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from lungsynth import paths
from lungsynth.config import parse_overrides, resolve_profile

CHAPTER_PATTERN = re.compile(r"^(\d\d)_([A-Za-z0-9_]+)\.ipynb$")


@dataclass(frozen=True)
class Chapter:
    number: str  # "03"
    slug: str  # "land"
    path: Path

    @property
    def name(self) -> str:
        return f"{self.number}_{self.slug}"

    def title(self) -> str:
        """The notebook's first markdown heading, e.g. ``03 — LAND: ...``."""
        nb = json.loads(self.path.read_text())
        for cell in nb.get("cells", []):
            if cell.get("cell_type") == "markdown":
                for line in "".join(cell.get("source", "")).splitlines():
                    if line.startswith("# "):
                        return line[2:].strip()
        return self.name


def chapters(notebooks: Path | None = None) -> list[Chapter]:
    """Every ``NN_slug.ipynb`` in the notebooks folder, in chapter order."""
    folder = notebooks or paths.notebooks_dir()
    found = []
    for path in sorted(folder.glob("*.ipynb")):
        match = CHAPTER_PATTERN.match(path.name)
        if match:
            found.append(Chapter(match.group(1), match.group(2), path))
    return found


def select(all_chapters: list[Chapter], only: str | None = None, start: str | None = None) -> list[Chapter]:
    """Chapters picked by ``--only 03,04`` or ``--from 03``; unknown numbers are errors."""
    valid = [c.number for c in all_chapters]

    def check(number: str) -> str:
        number = number.strip().zfill(2)
        if number not in valid:
            raise ValueError(f"unknown chapter {number!r}; valid chapters: {', '.join(valid)}")
        return number

    picked = all_chapters
    if only:
        wanted = {check(n) for n in only.split(",") if n.strip()}
        picked = [c for c in picked if c.number in wanted]
    if start:
        first = check(start)
        picked = [c for c in picked if c.number >= first]
    return picked


def library_fingerprint() -> str:
    """Hash of the library's source, so a chapter re-runs when the code under it changes."""
    digest = hashlib.sha256()
    for path in sorted(paths.PACKAGE_DIR.rglob("*.py")):
        digest.update(path.relative_to(paths.PACKAGE_DIR).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def inputs_key(chapter: Chapter, profile: str, overrides: Mapping[str, Any], library: str) -> str:
    digest = hashlib.sha256()
    digest.update(chapter.path.read_bytes())
    digest.update(json.dumps({"profile": profile, "overrides": dict(overrides), "library": library},
                             sort_keys=True).encode())
    return digest.hexdigest()[:16]


def course_dir(profile: str) -> Path:
    return paths.ensure_dir(paths.runs_dir(profile) / "course")


def _load_state(folder: Path) -> dict[str, Any]:
    state_file = folder / "state.json"
    return json.loads(state_file.read_text()) if state_file.is_file() else {}


def _save_state(folder: Path, state: dict[str, Any]) -> None:
    from lungsynth.runtime import write_json_atomic

    write_json_atomic(folder / "state.json", state)


def _append_log(folder: Path, row: dict[str, Any]) -> None:
    log = folder / "course_log.csv"
    new = not log.exists()
    with log.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _export_html(executed: Path) -> Path | None:
    """An HTML copy of an executed notebook, figures embedded (best effort: never fails the run)."""
    try:
        import nbformat
        from nbconvert import HTMLExporter

        body, _ = HTMLExporter().from_notebook_node(nbformat.read(executed, as_version=4))
        target = executed.with_suffix(".html")
        target.write_text(body)
        return target
    except Exception as exc:  # nbconvert templates missing etc.: the .ipynb is still there
        print(f"  (no HTML copy of {executed.name}: {exc})", file=sys.stderr)
        return None


def write_summary(profile: str, all_chapters: list[Chapter]) -> Path:
    """``runs/<profile>/course/index.html``: one row per chapter with status, time and links."""
    folder = course_dir(profile)
    state = _load_state(folder)
    rows = []
    for chapter in all_chapters:
        entry = state.get(chapter.name, {})
        status = entry.get("status", "not run")
        link = f'<a href="{chapter.name}.html">{html.escape(chapter.title())}</a>' \
            if (folder / f"{chapter.name}.html").exists() else html.escape(chapter.title())
        rows.append(f"<tr><td>{chapter.number}</td><td>{link}</td><td>{html.escape(status)}</td>"
                    f"<td>{entry.get('seconds', '')}</td><td>{html.escape(entry.get('finished', ''))}</td></tr>")
    page = (f"<html><head><meta charset='utf-8'><title>lungsynth course ({profile})</title></head><body>"
            f"<h1>lungsynth course — profile {profile}</h1><table border='1' cellpadding='4'>"
            "<tr><th>chapter</th><th>title</th><th>status</th><th>seconds</th><th>finished</th></tr>"
            + "".join(rows) + "</table></body></html>")
    target = folder / "index.html"
    target.write_text(page)
    return target


def run_chapter(chapter: Chapter, profile: str, overrides: Mapping[str, Any], out_dir: Path) -> Path:
    """Execute one notebook with papermill; raises ``ChapterFailed`` naming the cell on error."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    output = out_dir / chapter.path.name
    os.environ["LUNGSYNTH_PROFILE"] = profile
    try:
        pm.execute_notebook(str(chapter.path), str(output), parameters={"PROFILE": profile,
                            "OVERRIDES": dict(overrides)}, kernel_name="python3", progress_bar=True,
                            cwd=str(chapter.path.parent), log_output=False)
    except PapermillExecutionError as exc:
        raise ChapterFailed(chapter, output, exc.cell_index, f"{exc.ename}: {exc.evalue}") from None
    return output


class ChapterFailed(RuntimeError):
    def __init__(self, chapter: Chapter, output: Path, cell: int, error: str) -> None:
        super().__init__(f"chapter {chapter.number} ({chapter.path.name}) failed in cell {cell} of the executed notebook: {error}\n"
                         f"  the partly executed notebook is kept at {output}")
        self.chapter, self.output, self.cell, self.error = chapter, output, cell, error


def run_course(profile: str | None = None, only: str | None = None, start: str | None = None,
               force: bool = False, overrides: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run the selected chapters in order; returns one result row per chapter."""
    profile = resolve_profile(profile)
    overrides = dict(overrides or {})
    all_chapters = chapters()
    if not all_chapters:
        raise FileNotFoundError(f"no chapters found in {paths.notebooks_dir()}")
    picked = select(all_chapters, only, start)
    folder = course_dir(profile)
    state = _load_state(folder)
    library = library_fingerprint()
    results = []
    for chapter in picked:
        key = inputs_key(chapter, profile, overrides, library)
        previous = state.get(chapter.name, {})
        if not force and previous.get("status") == "ok" and previous.get("inputs") == key:
            print(f"[{chapter.number}] {chapter.title()}: already run with the same inputs (use --force)")
            results.append({"chapter": chapter.number, "status": "skipped", "seconds": 0.0})
            continue
        print(f"[{chapter.number}] {chapter.title()}")
        t0 = time.perf_counter()
        failure: ChapterFailed | None = None
        try:
            output = run_chapter(chapter, profile, overrides, folder)
            status = "ok"
        except ChapterFailed as exc:
            failure, output = exc, exc.output
            status = f"failed in cell {exc.cell}: {exc.error}"
        seconds = round(time.perf_counter() - t0, 1)
        finished = time.strftime("%Y-%m-%dT%H:%M:%S")
        if output.exists():
            _export_html(output)
        state[chapter.name] = {"status": status, "inputs": key, "seconds": seconds, "finished": finished}
        _save_state(folder, state)
        _append_log(folder, {"finished": finished, "profile": profile, "chapter": chapter.number,
                             "notebook": chapter.path.name, "status": status, "seconds": seconds})
        write_summary(profile, all_chapters)
        if failure is not None:
            raise failure
        print(f"[{chapter.number}] done in {seconds:.1f} s -> {output}")
        results.append({"chapter": chapter.number, "status": status, "seconds": seconds})
    print(f"summary: {folder / 'index.html'}")
    return results


# --------------------------------------------------------------------------- CLI


def register(sub: argparse._SubParsersAction) -> None:
    from lungsynth.config import add_profile_argument

    p = sub.add_parser("course", help="list or run the course's notebooks (papermill)")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>")
    verbs.required = True
    lst = verbs.add_parser("list", help="print the chapters in order")
    add_profile_argument(lst)
    lst.set_defaults(func=_cli_list)
    run = verbs.add_parser("run", help="run chapters in order with papermill")
    add_profile_argument(run)
    run.add_argument("--only", default=None, help="comma-separated chapters, e.g. 03,04")
    run.add_argument("--from", dest="start", default=None, help="start at this chapter, e.g. 03")
    run.add_argument("--force", action="store_true", help="re-run chapters already run with the same inputs")
    run.set_defaults(func=_cli_run)


def _cli_list(args: argparse.Namespace) -> int:
    profile = resolve_profile(args.profile)
    state = _load_state(paths.runs_dir(profile) / "course")
    for chapter in chapters():
        status = state.get(chapter.name, {}).get("status", "not run")
        print(f"{chapter.number}  {chapter.title():<70}  [{profile}: {status}]")
    return 0


def _cli_run(args: argparse.Namespace) -> int:
    try:
        run_course(args.profile, args.only, args.start, args.force, parse_overrides(args.overrides))
    except ChapterFailed as exc:
        print(f"lungsynth course: error: {exc}", file=sys.stderr)
        return 1
    return 0
