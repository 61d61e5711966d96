"""Quality gates: one measured claim about a chapter per row, judged against a fixed threshold.

A gate says whether a chapter does its job, by a number measured in this run: a value, the baseline it
is compared with (measured on the same data and the same number of samples), the threshold, and the
verdict. Thresholds are fixed where each gate is defined, with a comment saying why that value; they
are never loosened to make a gate pass. ``lungsynth quality`` collects the gates of every chapter
(:mod:`lungsynth.quality`) and writes ``runs/<profile>/quality.md`` / ``quality.json``.

Status: ``pass`` / ``fail`` (judged), ``insufficient N`` (too few samples to judge: never a pass),
``not trained`` (the chapter's model is missing; ``detail`` holds the command that trains it), ``info``
(a measurement the chapter reports without a threshold).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping

STATUSES = ("pass", "fail", "insufficient N", "not trained", "info")


@dataclass
class Gate:
    """One row of the quality report."""

    chapter: str  # "01"
    name: str
    status: str
    value: float | None = None
    threshold: str = ""  # e.g. ">= 0.95" or "<= 0.6 x baseline"
    baseline: float | None = None
    baseline_name: str = ""
    n: int | None = None
    n_needed: int | None = None
    detail: str = ""  # why this threshold, or how to train the chapter

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown gate status {self.status!r}; use one of {', '.join(STATUSES)}")

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(float(x))


def judge(chapter: str, name: str, value: float | None, *, n: int, n_needed: int = 1,
          at_least: float | None = None, at_most: float | None = None, factor: float | None = None,
          baseline: float | None = None, baseline_name: str = "", detail: str = "") -> Gate:
    """A judged gate. Exactly one form of threshold:

    - ``at_least=t`` / ``at_most=t``: value >= t / value <= t;
    - ``factor=f`` with ``baseline``: value <= f x baseline (lower is better, e.g. an error).

    Fewer than ``n_needed`` samples, or a value that could not be measured (None, NaN), is
    "insufficient N", never a pass.
    """
    forms = [at_least is not None, at_most is not None, factor is not None]
    if sum(forms) != 1:
        raise ValueError(f"gate {name!r}: give exactly one of at_least, at_most, factor")
    if factor is not None:
        threshold = f"<= {factor:g} x baseline"
        limit = factor * float(baseline) if _finite(baseline) else None
    else:
        threshold = f">= {at_least:g}" if at_least is not None else f"<= {at_most:g}"
        limit = at_least if at_least is not None else at_most
    common = dict(chapter=chapter, name=name, threshold=threshold, baseline=baseline, baseline_name=baseline_name,
                  n=int(n), n_needed=int(n_needed), detail=detail)
    if n < n_needed or not _finite(value) or limit is None:
        return Gate(status="insufficient N", value=float(value) if _finite(value) else None, **common)
    v = float(value)  # type: ignore[arg-type]
    ok = v >= limit if at_least is not None else v <= limit
    return Gate(status="pass" if ok else "fail", value=v, **common)


def info(chapter: str, name: str, value: float | None, *, n: int, detail: str = "",
         baseline: float | None = None, baseline_name: str = "") -> Gate:
    """A measurement reported without a threshold."""
    return Gate(chapter, name, "info", float(value) if _finite(value) else None, baseline=baseline,
                baseline_name=baseline_name, n=int(n), detail=detail)


def not_trained(chapter: str, name: str, command: str) -> Gate:
    """The chapter's model is missing: the row names the command that trains it."""
    return Gate(chapter, name, "not trained", detail=f"train it: `{command}`")


def as_table(gates: "list[Gate]") -> Any:
    """The gates as a pandas DataFrame (the columns a chapter prints beside its figures)."""
    import pandas as pd

    cols = ["chapter", "name", "value", "baseline", "threshold", "status", "n", "detail"]
    return pd.DataFrame([g.as_dict() for g in gates], columns=cols).set_index("name")


def file_digest(path: Path | str) -> str:
    """sha256 of a file (a checkpoint), so a cached gate belongs to exactly those weights."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached(path: Path | str, key: Mapping[str, Any], compute: Callable[[], list[Gate]]) -> list[Gate]:
    """The gates stored at ``path`` when they were measured under the same ``key`` (checkpoint digest, data
    fingerprint, gate version, ...), else ``compute()``, stored with the key. A chapter's notebook and
    ``lungsynth quality`` then measure a model once; any change of the key measures it again."""
    path = Path(path)
    key = json.loads(json.dumps(dict(key), sort_keys=True, default=str))
    try:
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            names = {f.name for f in fields(Gate)}
            return [Gate(**{k: v for k, v in row.items() if k in names}) for row in stored["gates"]]
    except (OSError, ValueError, TypeError, KeyError):
        pass  # missing, unreadable or from another version of the gates: measure again
    gates = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp_{path.name}")
    tmp.write_text(json.dumps({"key": key, "gates": [g.as_dict() for g in gates]}, indent=1))
    os.replace(tmp, path)
    return gates
