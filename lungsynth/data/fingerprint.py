"""The identity of a prepared dataset, and the record every derived artefact keeps of it.

A prepared folder P holds ``fingerprint.json``: a hash of what its numbers depend on (the scans and
patients of every split, the prepare and split settings, the source of every scan) and its source
(``phantom``, ``LIDC-IDRI`` or ``mixed``). Everything made from P (an autoencoder or method run, a
latent cache, a synthetic dataset, an evaluation or downstream result) keeps a *stamp* of it in
``data.json``: P's fingerprint plus the patients the artefact was trained on.

Three rules follow, and this module is where they are enforced:

- a run made from another fingerprint is an error naming both and the command that rebuilds it
  (:func:`claim_run`, :func:`check_run`); a cache is rebuilt with a message (:func:`cache_current`);
- a run or cache without a stamp (made before stamps existed) is not trusted: it is rebuilt, with a message;
- nothing is scored on a patient it was trained on (:func:`refuse_overlap`).

Shapes: stamps are plain JSON dicts ``{"id", "source", "prepared", "splits": {split: [patients]},
"trained_on": {"splits": [...], "patients": [...]}}``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

FILENAME = "fingerprint.json"  # in a prepared folder
STAMP = "data.json"  # beside every derived artefact
SOURCE_NAMES = {"phantom": "phantom", "dicom": "LIDC-IDRI"}
CHECKPOINTS = ("last.pt", "final.pt")


class DataMismatch(ValueError):
    """A derived artefact was made from other data than the data it is used with."""


class PatientOverlap(ValueError):
    """A model would be scored on a patient it was trained on."""


# --------------------------------------------------------------------------- prepared folders


def compute(records: Sequence[Mapping[str, Any]], splits: Mapping[str, Sequence[str]],
            split_settings: Mapping[str, Any]) -> dict[str, Any]:
    """The fingerprint of a prepared folder from its done records, its splits and the split settings."""
    scans = sorted((r["scan"]["scan_id"], r["scan"]["patient_id"], str(r["scan"].get("source", "")),
                    json.dumps(r.get("config"), sort_keys=True)) for r in records)
    body = {"scans": scans, "splits": {k: sorted(v) for k, v in splits.items()}, "split_settings": dict(split_settings)}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    sources = sorted({SOURCE_NAMES.get(s[2], s[2] or "unknown") for s in scans})
    return {"id": digest, "source": sources[0] if len(sources) == 1 else ("mixed" if sources else "empty"),
            "splits": body["splits"], "n_scans": len(scans)}


def write(prepared: Path | str, fingerprint: Mapping[str, Any]) -> None:
    from lungsynth.runtime import write_json_atomic

    write_json_atomic(Path(prepared) / FILENAME, dict(fingerprint))


def read(prepared: Path | str) -> dict[str, Any] | None:
    """P's fingerprint, or None when P predates fingerprints (or the file is unreadable)."""
    return _read_json(Path(prepared) / FILENAME)


def load(prepared: Path | str) -> dict[str, Any]:
    """P's fingerprint; a clear error when it has none."""
    fp = read(prepared)
    if fp is None:
        raise FileNotFoundError(f"{Path(prepared) / FILENAME} is missing: the prepared folder predates data "
                                "fingerprints. Rebuild its manifest: `lungsynth data default --profile PROFILE` "
                                "(or `lungsynth data prepare ...` for a LIDC-IDRI folder).")
    return fp


def source_label(prepared: Path | str) -> str:
    """"phantom", "LIDC-IDRI" or "mixed": what every table and figure title says its numbers come from."""
    fp = read(prepared)
    return fp["source"] if fp else "unknown source"


def patients(prepared: Path | str, splits: Iterable[str]) -> list[str]:
    fp = load(prepared)
    return sorted({p for s in splits for p in fp["splits"].get(s, [])})


# --------------------------------------------------------------------------- stamps


def stamp(prepared: Path | str, trained_on: Sequence[str] = ("train",),
          extra_patients: Iterable[str] = ()) -> dict[str, Any]:
    """The stamp of an artefact made from P and trained on the patients of ``trained_on`` (and
    ``extra_patients``, e.g. the patients behind a generator's samples)."""
    fp = load(prepared)
    trained = sorted(set(patients(prepared, trained_on)) | set(extra_patients))
    return {"id": fp["id"], "source": fp["source"], "prepared": str(Path(prepared)),
            "trained_on": {"splits": list(trained_on), "patients": trained}}


def write_stamp(where: Path | str, value: Mapping[str, Any]) -> None:
    from lungsynth.runtime import write_json_atomic

    Path(where).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(where) / STAMP, dict(value))


def read_stamp(where: Path | str) -> dict[str, Any] | None:
    return _read_json(Path(where) / STAMP)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # half-written or corrupt: treated as absent, so the artefact is redone
    return value if isinstance(value, dict) and "id" in value else None


def _mismatch(where: Path, had: Mapping[str, Any], now: Mapping[str, Any], rebuild: str) -> DataMismatch:
    return DataMismatch(
        f"{where} was made from prepared data {had['id']} ({had.get('source')}, {had.get('prepared')}), but the "
        f"data now is {now['id']} ({now['source']}, {now['prepared']}): the splits or the prepare settings "
        f"changed, so its training patients may now be scored on. Rebuild it: `{rebuild}`")


def claim_run(run_dir: Path | str, value: Mapping[str, Any] | None, rebuild: str, fresh: bool = False) -> bool:
    """Before training into ``run_dir``: stamp it, and say whether training must start fresh.

    True when ``fresh`` or when ``run_dir`` holds checkpoints without a stamp (made before stamps: not
    trusted, so retrained from scratch, with a message). A stamp of another fingerprint is
    :class:`DataMismatch`, unless ``fresh`` (the rebuild the error asks for): then the other data's
    checkpoints are removed first, so a rebuild killed before its end never leaves them under the new stamp.
    ``value`` None (training on data given in memory, not a prepared folder) records nothing and returns ``fresh``.
    """
    if value is None:  # the caller trains on its own data, not a prepared folder: nothing to record
        return fresh
    run_dir = Path(run_dir)
    had = read_stamp(run_dir)
    if had is None and any((run_dir / c).is_file() for c in CHECKPOINTS):
        print(f"{run_dir}: its checkpoints carry no data stamp (made before data fingerprints); "
              "training again from scratch")
        fresh = True
    elif had is not None and had["id"] != value["id"]:
        if not fresh:
            raise _mismatch(run_dir, had, value, rebuild)
        for name in CHECKPOINTS:  # lungsynth's own checkpoints of the other data, inside this run folder only
            (run_dir / name).unlink(missing_ok=True)
        print(f"{run_dir}: made from data {had['id']}; its checkpoints removed, training afresh on {value['id']}")
    write_stamp(run_dir, value)
    return fresh


def check_run(run_dir: Path | str, value: Mapping[str, Any] | None, rebuild: str) -> bool:
    """Before reusing a finished run: True when its stamp matches ``value``; False (with a message) when
    it has none, so the caller retrains; :class:`DataMismatch` when it was made from other data."""
    if value is None:  # the caller's own data
        return True
    run_dir = Path(run_dir)
    had = read_stamp(run_dir)
    if had is None:
        if any((run_dir / c).is_file() for c in CHECKPOINTS):
            print(f"{run_dir}: no data stamp (made before data fingerprints); not trusted, training again")
        return False
    if had["id"] != value["id"]:
        raise _mismatch(run_dir, had, value, rebuild)
    return True


def cache_current(cache_dir: Path | str, value: Mapping[str, Any], what: str = "cache") -> bool:
    """True when a cache's stamp matches ``value``; otherwise False, with a message saying it is rebuilt."""
    had = read_stamp(cache_dir)
    if had is not None and had["id"] == value["id"]:
        return True
    if Path(cache_dir).exists() and any(Path(cache_dir).iterdir()):
        why = "has no data stamp" if had is None else f"was made from data {had['id']}, not {value['id']}"
        print(f"{cache_dir}: the {what} {why}; rebuilding it")
    return False


def derived_stamp(generator: Path | str | None, prepared: Path | str) -> dict[str, Any]:
    """The stamp of samples drawn from the model in ``generator`` (a run folder) on the conditions of P:
    P's fingerprint and the generator's training patients (None when the generator records none).
    A generator stamped with another fingerprint is :class:`DataMismatch`."""
    fp = load(prepared)
    gen = read_stamp(generator) if generator is not None and Path(generator).is_dir() else None
    now = {**fp, "prepared": str(Path(prepared))}
    if gen is not None and gen["id"] != fp["id"]:
        raise _mismatch(Path(str(generator)), gen, now, "retrain the method on the current data (its chapter)")
    return {"id": fp["id"], "source": fp["source"], "prepared": str(Path(prepared)),
            "generator": str(generator) if generator is not None else None,
            "trained_on": gen["trained_on"] if gen is not None else None}


def refuse_overlap(model: Mapping[str, Any] | Path | str | None, prepared: Path | str, splits: Sequence[str],
                   what: str = "model") -> None:
    """Raise :class:`PatientOverlap` when ``model`` (a stamp, or a folder holding one) was trained on a
    patient of ``splits`` of P, or was made from other data (:class:`DataMismatch`)."""
    if model is None:
        return
    where = None
    if isinstance(model, (str, Path)):
        where, model = Path(model), read_stamp(model)
        if model is None:
            raise DataMismatch(f"{where} records no data stamp, so its training patients are unknown and it "
                               f"cannot be scored; retrain it")
    fp = load(prepared)
    if model.get("trained_on") is None:
        raise DataMismatch(f"the {what}{f' in {where}' if where else ''} records no training patients (its "
                           f"generator carries no data stamp), so it cannot be scored; retrain the generator")
    if model["id"] != fp["id"]:
        raise _mismatch(where or Path(str(model.get("prepared"))), model,
                        {**fp, "prepared": str(prepared)}, "retrain it on the current data")
    scored = set(patients(prepared, splits))
    both = sorted(scored & set(model.get("trained_on", {}).get("patients", [])))
    if both:
        raise PatientOverlap(f"the {what}{f' in {where}' if where else ''} was trained on {len(both)} patient(s) of "
                             f"the {'/'.join(splits)} split it would be scored on ({', '.join(both[:5])}"
                             f"{', ...' if len(both) > 5 else ''}); score it on patients it never saw")
