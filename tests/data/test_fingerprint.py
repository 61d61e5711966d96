"""Data fingerprints and stamps: a run or cache is never reused on other data, nothing is scored on a
patient it was trained on, and an artefact from before fingerprints is rebuilt, not trusted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lungsynth.data import fingerprint
from lungsynth.data.fingerprint import DataMismatch, PatientOverlap

SPLITS = {"train": ["P1", "P2"], "val": ["P3"], "test": ["P4"]}


def _records(source: str = "phantom", version: int = 2) -> list[dict]:
    return [{"scan": {"scan_id": f"{p}_s1", "patient_id": p, "source": source}, "config": {"version": version}}
            for p in ("P1", "P2", "P3", "P4")]


def _prepared(tmp_path: Path, splits=SPLITS, **kw) -> Path:
    P = tmp_path / "prepared"
    P.mkdir(parents=True, exist_ok=True)
    fingerprint.write(P, fingerprint.compute(_records(**kw), splits, {"split_seed": 0}))
    return P


def test_the_fingerprint_follows_the_splits_the_settings_and_the_scans():
    base = fingerprint.compute(_records(), SPLITS, {"split_seed": 0})
    assert base == fingerprint.compute(list(reversed(_records())), SPLITS, {"split_seed": 0})  # order-free
    moved = {"train": ["P1", "P4"], "val": ["P3"], "test": ["P2"]}
    others = [fingerprint.compute(_records(), moved, {"split_seed": 0}),
              fingerprint.compute(_records(), SPLITS, {"split_seed": 1}),
              fingerprint.compute(_records(version=1), SPLITS, {"split_seed": 0}),
              fingerprint.compute(_records()[:3], SPLITS, {"split_seed": 0})]
    assert len({base["id"], *(o["id"] for o in others)}) == 5
    assert base["source"] == "phantom"
    assert fingerprint.compute(_records("dicom"), SPLITS, {})["source"] == "LIDC-IDRI"
    assert fingerprint.compute(_records()[:2] + _records("dicom")[2:], SPLITS, {})["source"] == "mixed"


def test_a_run_made_from_other_splits_is_refused_with_both_ids_and_the_rebuild_command(tmp_path, capsys):
    P = _prepared(tmp_path)
    run = tmp_path / "run"
    old = fingerprint.stamp(P)
    assert old["trained_on"]["patients"] == ["P1", "P2"]
    assert fingerprint.claim_run(run, old, "REBUILD") is False  # a new run: stamped, nothing to redo
    (run / "final.pt").write_bytes(b"")
    assert fingerprint.check_run(run, old, "REBUILD")

    P2 = _prepared(tmp_path / "b", splits={"train": ["P1", "P4"], "val": ["P3"], "test": ["P2"]})
    new = fingerprint.stamp(P2)
    for call in (fingerprint.check_run, fingerprint.claim_run):
        with pytest.raises(DataMismatch) as err:
            call(run, new, "lungsynth x train --fresh")
        msg = str(err.value)
        assert old["id"] in msg and new["id"] in msg and "lungsynth x train --fresh" in msg
    assert fingerprint.read_stamp(run)["id"] == old["id"]  # the refused claim wrote nothing
    # the rebuild the error asks for (--fresh): the other data's checkpoints go, the new stamp is written
    assert fingerprint.claim_run(run, new, "REBUILD", fresh=True) is True
    assert fingerprint.read_stamp(run)["id"] == new["id"] and not (run / "final.pt").exists()
    assert "training afresh" in capsys.readouterr().out
    assert fingerprint.claim_run(run, None, "R", fresh=True) is True  # data given in memory: --fresh still holds

    # checkpoints without a stamp (made before fingerprints): not trusted, retrained from scratch
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "last.pt").write_bytes(b"")
    assert fingerprint.check_run(legacy, new, "R") is False
    assert fingerprint.claim_run(legacy, new, "R") is True
    assert "no data stamp" in capsys.readouterr().out
    assert fingerprint.read_stamp(legacy)["id"] == new["id"]


def test_a_stale_or_half_written_cache_is_rebuilt(tmp_path, capsys):
    P = _prepared(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "000000.pt").write_bytes(b"x")
    value = fingerprint.stamp(P)
    assert not fingerprint.cache_current(cache, value, "latent cache")  # no stamp yet
    assert "has no data stamp; rebuilding" in capsys.readouterr().out
    fingerprint.write_stamp(cache, value)
    assert fingerprint.cache_current(cache, value)
    (cache / fingerprint.STAMP).write_text('{"id": "ab')  # killed while writing
    assert not fingerprint.cache_current(cache, value)
    fingerprint.write_stamp(cache, {**value, "id": "0123"})
    assert not fingerprint.cache_current(cache, value)
    assert "made from data 0123" in capsys.readouterr().out


def test_nothing_is_scored_on_a_patient_it_was_trained_on(tmp_path):
    P = _prepared(tmp_path)
    run = tmp_path / "run"
    fingerprint.write_stamp(run, fingerprint.stamp(P, ("train",)))
    fingerprint.refuse_overlap(run, P, ("val", "test"))  # disjoint: fine
    with pytest.raises(PatientOverlap, match=r"2 patient\(s\) of the train split.*P1, P2"):
        fingerprint.refuse_overlap(run, P, ("train",))
    leaky = fingerprint.stamp(P, ("train", "val"))
    with pytest.raises(PatientOverlap, match="P3"):
        fingerprint.refuse_overlap(leaky, P, ("val", "test"))
    with pytest.raises(DataMismatch, match="no data stamp"):
        fingerprint.refuse_overlap(tmp_path / "nowhere", P, ("test",))
    other = _prepared(tmp_path / "b", splits={"train": ["P3"], "val": ["P1"], "test": ["P2", "P4"]})
    with pytest.raises(DataMismatch, match="Rebuild it"):
        fingerprint.refuse_overlap(run, other, ("test",))


def test_source_labels(tmp_path):
    P = _prepared(tmp_path / "a")
    assert fingerprint.source_label(P) == "phantom"
    R = _prepared(tmp_path / "b", source="dicom")
    assert fingerprint.source_label(R) == "LIDC-IDRI"
    assert fingerprint.source_label(tmp_path / "none") == "unknown source"
    assert json.loads((P / fingerprint.FILENAME).read_text())["splits"] == SPLITS
