"""``lungsynth quality``: every chapter's quality gates, in one report.

The gates of chapter 01 live in :mod:`lungsynth.data.gates`, chapter 02's in
:func:`lungsynth.autoencoders.evaluate.quality_gates`, each method's on its face
(:meth:`lungsynth.methods.base.MethodFace.quality_gates`), chapters 10-11's in
:mod:`lungsynth.downstream.gates`. This module only collects them, never trains: a chapter without a model is listed as "not trained" with its command. The report is
``runs/<profile>/quality.md`` (a table a reader can scan) and ``quality.json`` (the same rows).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from lungsynth.gates import STATUSES, Gate

REPORT_MD, REPORT_JSON = "quality.md", "quality.json"


def _data(cfg: Any) -> list[Gate]:
    from lungsynth.data.gates import quality_gates

    return quality_gates(cfg)


def _autoencoders(cfg: Any) -> list[Gate]:
    from lungsynth.autoencoders.evaluate import quality_gates

    return quality_gates(cfg)


def _downstream_segmentation(cfg: Any) -> list[Gate]:
    from lungsynth.downstream.gates import segmentation_gates

    return segmentation_gates(cfg)


def _downstream_classification(cfg: Any) -> list[Gate]:
    from lungsynth.downstream.gates import classification_gates

    return classification_gates(cfg)


def chapter_gates() -> dict[str, tuple[str, Callable[[Any], list[Gate]]]]:
    """``{chapter: (title, cfg -> gates)}`` in chapter order: data, autoencoders, each method face, downstream."""
    from lungsynth.sampling.registry import METHODS

    out: dict[str, tuple[str, Callable[[Any], list[Gate]]]] = {
        "01": ("prepared data", _data), "02": ("autoencoders", _autoencoders),
        "10": ("downstream segmentation", _downstream_segmentation),
        "11": ("downstream classification", _downstream_classification)}
    for face in METHODS.values():
        out.setdefault(face.chapter, (face.name, face.quality_gates))
    return dict(sorted(out.items()))


def course_chapters() -> list[str]:
    """Every chapter a report should account for: those with gates and every notebook from 01 on."""
    from lungsynth import paths

    numbers = {number for number, _, _ in paths.chapter_notebooks() if number != "00"}
    return sorted(numbers | set(chapter_gates()))


def run_quality(cfg: Any, only: Sequence[str] | None = None, progress: bool = True) -> list[Gate]:
    """The gates of every chapter (or ``only`` those numbers), in chapter order."""
    table = chapter_gates()
    wanted = [str(c).zfill(2) for c in only] if only else list(table)
    unknown = [c for c in wanted if c not in table]
    if unknown:
        raise ValueError(f"no quality gates for chapter(s) {unknown}; chapters with gates: {', '.join(table)}")
    gates: list[Gate] = []
    for chapter in wanted:
        title, fn = table[chapter]
        t0 = time.perf_counter()
        rows = fn(cfg)
        if progress:
            print(f"quality {chapter} {title}: {len(rows)} gates in {time.perf_counter() - t0:.1f} s", flush=True)
        gates += rows
    return gates


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _status(g: Gate) -> str:
    if g.status == "insufficient N":
        return f"insufficient N ({g.n}, needed {g.n_needed})"
    return {"pass": "**pass**", "fail": "**FAIL**"}.get(g.status, g.status)


def report_markdown(gates: Sequence[Gate], profile: str, source: str, chapters: Sequence[str] = ()) -> str:
    """The report as markdown: a count line, one table row per gate, the chapters without gates."""
    counts = {s: sum(g.status == s for g in gates) for s in STATUSES}
    head = ["chapter", "gate", "value", "baseline", "threshold", "status", "n", "detail"]
    lines = [f"# Quality gates ({profile}, {source})", "",
             "Each gate compares a value measured in this run with a fixed threshold (and, where it has one, a "
             "baseline measured on the same data and N). Never loosened to pass.", "",
             " · ".join(f"{counts[s]} {s}" for s in STATUSES if counts[s]) or "no gates", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in gates:
        base = f"{_fmt(g.baseline)} ({g.baseline_name})" if g.baseline is not None else "-"
        lines.append("| " + " | ".join([g.chapter, g.name, _fmt(g.value), base, g.threshold or "-", _status(g),
                                        _fmt(g.n), g.detail.replace("|", "/")]) + " |")
    missing = [c for c in chapters if not any(g.chapter == c for g in gates)]
    if missing:
        lines += ["", f"Chapters without gates yet: {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def write_report(gates: Sequence[Gate], out_dir: Path | str, profile: str, source: str,
                 chapters: Sequence[str] = ()) -> dict[str, Path]:
    """``quality.md`` and ``quality.json`` in ``out_dir``, written atomically."""
    import os

    from lungsynth.runtime import write_json_atomic

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / REPORT_MD
    tmp = md.with_name(f".tmp_{REPORT_MD}")
    tmp.write_text(report_markdown(gates, profile, source, chapters))
    os.replace(tmp, md)
    write_json_atomic(out_dir / REPORT_JSON, {"profile": profile, "source": source,
                                              "gates": [g.as_dict() for g in gates]})
    return {"md": md, "json": out_dir / REPORT_JSON}


def quality(cfg: Any, only: Sequence[str] | None = None, out_dir: Path | str | None = None,
            progress: bool = True) -> tuple[list[Gate], dict[str, Path]]:
    """Run the gates and write the report (default ``runs/<profile>/``); returns (gates, files)."""
    from lungsynth import paths
    from lungsynth.data.datasets import prepared_folder
    from lungsynth.data.fingerprint import source_label

    gates = run_quality(cfg, only, progress)
    source = source_label(prepared_folder(cfg))
    chapters = [str(c).zfill(2) for c in only] if only else course_chapters()
    files = write_report(gates, out_dir or paths.runs_dir(cfg.profile), cfg.profile, source, chapters)
    return gates, files


# --------------------------------------------------------------------------- CLI


def register(sub: argparse._SubParsersAction) -> None:
    """``lungsynth quality [--profile P] [--only 01,02]``."""
    from lungsynth.config import add_profile_argument

    p = sub.add_parser("quality", help="run every trained chapter's quality gates; write runs/<profile>/quality.md")
    p.add_argument("--only", default=None, help="chapters, e.g. 01,02 (default: all)")
    p.add_argument("--out", default=None, help="report folder (default runs/<profile>/)")
    add_profile_argument(p)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from lungsynth.config import get_config, parse_overrides

    cfg = get_config(args.profile, parse_overrides(args.overrides))
    only = [c for c in args.only.split(",") if c.strip()] if args.only else None
    gates, files = quality(cfg, only, args.out)
    print(files["md"].read_text())
    print(f"wrote {files['md']} and {files['json']}")
    return 0
