"""Quality-gate rows: thresholds judged as written, and too few samples never a pass."""

import math

import pytest

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
