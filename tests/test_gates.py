"""Quality-gate rows: thresholds judged as written, and too few samples never a pass."""

import math

import pytest

from lungsynth import gates as G
from lungsynth.gates import Gate, info, judge, not_trained


def test_absolute_and_relative_thresholds():
    assert judge("01", "g", 0.96, n=10, at_least=0.95).status == "pass"
    assert judge("01", "g", 0.94, n=10, at_least=0.95).status == "fail"
    assert judge("01", "g", 3.0, n=10, at_most=3.0).status == "pass"
    g = judge("02", "mae", 30.0, n=10, factor=0.6, baseline=50.0, baseline_name="linear x4")
    assert g.status == "pass" and g.threshold == "<= 0.6 x baseline" and g.passed  # 30 <= 0.6 * 50
    assert judge("02", "mae", 30.1, n=10, factor=0.6, baseline=50.0).status == "fail"


def test_too_few_samples_or_no_value_is_never_a_pass():
    g = judge("02", "mae", 1.0, n=2, n_needed=5, factor=0.6, baseline=50.0)
    assert g.status == "insufficient N" and not g.passed and g.value == 1.0
    assert judge("01", "g", math.nan, n=9, at_least=0.5).status == "insufficient N"
    assert judge("01", "g", None, n=9, at_least=0.5).status == "insufficient N"
    assert judge("02", "g", 1.0, n=9, factor=0.6, baseline=math.nan).status == "insufficient N"


def test_bad_forms_and_other_rows():
    with pytest.raises(ValueError, match="exactly one"):
        judge("01", "g", 1.0, n=1, at_least=0.5, at_most=2.0)
    with pytest.raises(ValueError, match="unknown gate status"):
        Gate("01", "g", "ok")
    row = not_trained("02", "vae3d autoencoder", "lungsynth autoencoder train --kind vae3d")
    assert row.status == "not trained" and "lungsynth autoencoder train --kind vae3d" in row.detail
    assert info("02", "t1", 12.5, n=3).as_dict()["passed"] is False


def test_cached_gates_are_reused_for_the_same_key_only(tmp_path):
    calls = []

    def measure():
        calls.append(1)
        return [G.judge("02", f"mae {len(calls)}", 10.0 * len(calls), n=30, n_needed=5, factor=0.6, baseline=20.0,
                        baseline_name="linear x4")]

    path = tmp_path / "run" / "gates.json"
    first = G.cached(path, {"weights": "abc", "data": "fp1"}, measure)
    again = G.cached(path, {"data": "fp1", "weights": "abc"}, measure)  # key order does not matter
    assert calls == [1] and again == first and again[0].status == "pass" and again[0].baseline_name == "linear x4"
    other = G.cached(path, {"weights": "abd", "data": "fp1"}, measure)  # other weights: measured again
    assert calls == [1, 1] and other[0].name == "mae 2" and other[0].status == "fail"
    path.write_text("{not json")
    G.cached(path, {"weights": "abd", "data": "fp1"}, measure)  # unreadable: measured again, never a crash
    assert len(calls) == 3


def test_file_digest_follows_the_bytes(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"weights" * 1000)
    b.write_bytes(b"weights" * 1000)
    assert G.file_digest(a) == G.file_digest(b)
    b.write_bytes(b"weights" * 999 + b"Weights")
    assert G.file_digest(a) != G.file_digest(b)
