"""Run the course's notebooks in order with papermill: ``lungsynth course list|run|all|report|figures``.

Each chapter is executed into ``runs/<profile>/course/NN_slug.ipynb`` (kept even when a
cell fails, so the partial output can be read), with an HTML copy, a CSV log of per-chapter
timings and an ``index.html`` summary. A chapter already run with the same inputs (notebook,
profile, overrides and library source) is skipped unless ``--force``.

``all`` is what ``make course`` runs: the data, every chapter and the quality report, each timed in
the log. ``report`` turns the log and the quality report into the README's "What the course gives,
measured" section; ``figures`` copies each method chapter's sample figure into ``docs/``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import html
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from lungsynth import paths
from lungsynth.config import parse_overrides, resolve_profile



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
    return [Chapter(number, slug, path) for number, slug, path in paths.chapter_notebooks(notebooks)]


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


# --------------------------------------------------------------------------- the whole course

# The stages around the chapters, run as their own commands (they live on the same floor as this module).
STAGES: dict[str, tuple[str, ...]] = {"data": ("data", "default"), "quality": ("quality",)}


def run_stage(name: str, profile: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run ``lungsynth <STAGES[name]> --profile P`` in a child process; log its seconds like a chapter."""
    import subprocess

    command = [sys.executable, "-m", "lungsynth", *STAGES[name], "--profile", profile]
    for key, value in (overrides or {}).items():
        command += ["--set", f"{key}={value}"]
    print(f"[{name}] lungsynth {' '.join(command[3:])}", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run(command).returncode
    seconds = round(time.perf_counter() - t0, 1)
    status = "ok" if rc == 0 else f"failed with exit code {rc}"
    _append_log(course_dir(profile), {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "profile": profile,
                                      "chapter": name, "notebook": "", "status": status, "seconds": seconds})
    if rc != 0:
        raise RuntimeError(f"stage {name} failed (exit code {rc}): {' '.join(command)}")
    print(f"[{name}] done in {seconds:.1f} s", flush=True)
    return {"chapter": name, "status": status, "seconds": seconds}


def run_all(profile: str | None = None, force: bool = False,
            overrides: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """``make course``: the data, every chapter in order, then the quality report; returns the rows."""
    profile = resolve_profile(profile)
    t0 = time.perf_counter()
    rows = [run_stage("data", profile, overrides)]
    rows += run_course(profile, force=force, overrides=overrides)
    rows.append(run_stage("quality", profile, overrides))
    print(f"the whole course ({profile}): {(time.perf_counter() - t0) / 60:.1f} minutes")
    return rows


def last_run(profile: str) -> list[dict[str, str]]:
    """The log rows of the latest ``all``: from its last ``data`` row on (or every row, without one), one row per
    stage in course order; a chapter run again after it (``--only``) replaces its earlier row."""
    log = paths.runs_dir(profile) / "course" / "course_log.csv"
    if not log.is_file():
        raise FileNotFoundError(f"no course log at {log}; run `make course` (or `lungsynth course all --profile "
                                f"{profile}`) first")
    with log.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    starts = [i for i, r in enumerate(rows) if r["chapter"] == "data"]
    latest = {r["chapter"]: r for r in (rows[starts[-1]:] if starts else rows)}
    order = ["data"] + [c.number for c in chapters()] + ["quality"]
    return sorted(latest.values(), key=lambda r: order.index(r["chapter"]) if r["chapter"] in order else len(order))


README_START = "<!-- course-measured:start -->"
README_END = "<!-- course-measured:end -->"


def measured_section(profile: str, figures: Mapping[str, str] | None = None) -> str:
    """The README section "What the course gives, measured", from the course log and ``quality.json``."""
    from lungsynth.runtime import choose_precision, cpu_flags, cpu_model

    rows = last_run(profile)
    titles = {c.number: c.title() for c in chapters()}
    quality_json = paths.runs_dir(profile) / "quality.json"
    report = json.loads(quality_json.read_text()) if quality_json.is_file() else {"gates": [], "source": "?"}
    total = sum(float(r["seconds"]) for r in rows)
    model = cpu_model()
    flags = cpu_flags()
    avx = "AMX" if "amx_bf16" in flags else ("AVX512-BF16, no AMX" if "avx512_bf16" in flags else "no AVX512-BF16 or AMX")
    when = rows[-1]["finished"] if rows else "?"
    logged = {r["chapter"] for r in rows if r["status"] == "ok"}
    missing = [number for number in titles if number not in logged]
    took = (f"The stages below took **{total / 60:.0f} minutes**; chapters {', '.join(missing)} are not in this "
            "run." if missing else f"The whole course took **{total / 60:.0f} minutes**.")
    lines = [f"Generated by `lungsynth course report` from the `{profile}` run that finished {when}: "
             f"{model}, {os.cpu_count()} cores ({avx}), precision {choose_precision().name}, data "
             f"{report.get('source', '?')}. {took}", "",
             "| stage | minutes | status |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {titles.get(r['chapter'], r['chapter'])} | {float(r['seconds']) / 60:.1f} | {r['status']} |")
    gates = report.get("gates", [])
    counts = {s: sum(g["status"] == s for g in gates) for s in sorted({g["status"] for g in gates})}
    lines += ["", f"Quality gates (`runs/{profile}/quality.md`): " + (", ".join(f"{n} {s}" for s, n in counts.items())
                                                                 or "none ran") + ".", "",
              "| chapter | gate | value | baseline | threshold | status | n |", "|---|---|---|---|---|---|---|"]
    for g in gates:
        base = "-" if g.get("baseline") is None else f"{_short(g['baseline'])} ({g.get('baseline_name', '')})"
        lines.append(f"| {g['chapter']} | {g['name']} | {_short(g.get('value'))} | {base} | {g.get('threshold') or '-'} "
                     f"| {g['status']} | {_short(g.get('n'))} |")
    if figures:
        lines += ["", "One figure per method, as its chapter draws it in this run:", ""]
        lines += [f"![{title}]({path})" for title, path in figures.items()]
    return "\n".join(lines) + "\n"


def _short(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def write_readme_section(readme: Path, section: str) -> None:
    """Replace the text between the README's course-measured markers with ``section``."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme} has no {README_START} ... {README_END} markers to write between")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(head + README_START + "\n" + section + README_END + tail)


# The cell of each method chapter whose figure goes into docs/ (tagged "course-figure" in the notebook).
FIGURE_TAG = "course-figure"


def export_figures(profile: str, out_dir: Path, max_side: int = 900) -> dict[str, str]:
    """The first PNG of each executed chapter's ``course-figure`` cell, written to ``out_dir/NN_slug.png``
    (downscaled to ``max_side`` pixels); returns {chapter title: path relative to the repository}."""
    import base64
    import io

    from PIL import Image

    folder = paths.runs_dir(profile) / "course"
    out_dir.mkdir(parents=True, exist_ok=True)
    found: dict[str, str] = {}
    for chapter in chapters():
        executed = folder / chapter.path.name
        if not executed.is_file():
            continue
        nb = json.loads(executed.read_text())
        for cell in nb.get("cells", []):
            if FIGURE_TAG not in cell.get("metadata", {}).get("tags", []):
                continue
            png = next((o["data"]["image/png"] for o in cell.get("outputs", []) if "image/png" in o.get("data", {})), None)
            if png is None:
                continue
            image = Image.open(io.BytesIO(base64.b64decode(png)))
            image.thumbnail((max_side, max_side))
            target = out_dir / f"{chapter.name}.png"
            image.save(target, optimize=True)
            where = target.resolve()
            found[chapter.title()] = (where.relative_to(paths.REPO_DIR).as_posix()
                                      if where.is_relative_to(paths.REPO_DIR) else str(where))
            break
    return found


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
    whole = verbs.add_parser("all", help="the data, every chapter and the quality report (what `make course` runs)")
    add_profile_argument(whole)
    whole.add_argument("--force", action="store_true", help="re-run chapters already run with the same inputs")
    whole.set_defaults(func=_cli_all)
    rep = verbs.add_parser("report", help="the README section 'What the course gives, measured', from the last run")
    add_profile_argument(rep)
    rep.add_argument("--readme", type=Path, default=None, help="write it into this README (between its markers)")
    rep.add_argument("--figures", type=Path, default=None, help="also copy each method's figure into this folder")
    rep.set_defaults(func=_cli_report)


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


def _cli_all(args: argparse.Namespace) -> int:
    try:
        run_all(args.profile, args.force, parse_overrides(args.overrides))
    except (ChapterFailed, RuntimeError) as exc:
        print(f"lungsynth course: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _cli_report(args: argparse.Namespace) -> int:
    profile = resolve_profile(args.profile)
    figures = export_figures(profile, args.figures) if args.figures else None
    section = measured_section(profile, figures)
    if args.readme:
        write_readme_section(args.readme, section)
        print(f"wrote the measured section into {args.readme}")
    else:
        print(section)
    return 0
