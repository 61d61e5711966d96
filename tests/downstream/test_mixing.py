"""The ratio mixer, scarcity subsets, class balancing and the test-patient guard."""

from pathlib import Path

import pandas as pd
import pytest

from lungsynth.downstream import mixing as X
from lungsynth.downstream.common import load_pools
from lungsynth.downstream.data import heldout_patients, real_items, synthetic_items


def _table(n, synthetic, labels=None, prefix="r"):
    return pd.DataFrame({"item_id": [f"{prefix}{i}" for i in range(n)], "patient_id": [f"P{prefix}{i}" for i in range(n)],
                         "synthetic": synthetic, "condition_patient": None, "condition_split": None,
                         "subtype_id": labels if labels is not None else [0] * n})


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_ratio_gives_the_asked_proportion(ratio):
    real, syn = _table(20, False), _table(30, True, prefix="s")
    mix = X.mix_ratio(real, syn, ratio, seed=1)
    c = X.composition(mix)
    assert c["n_real"] == 20 and c["n_synthetic"] == round(ratio * 20)
    assert set(mix.loc[~mix["synthetic"], "item_id"]) == set(real["item_id"])  # all real items kept
    assert mix.loc[mix["synthetic"], "item_id"].is_unique
    assert X.mix_ratio(real, syn, ratio, seed=1).equals(mix)  # deterministic


def test_ratio_pool_too_small_is_an_error_unless_repeats():
    real, syn = _table(10, False), _table(4, True, prefix="s")
    with pytest.raises(ValueError, match="10 synthetic items asked but the pool holds 4"):
        X.mix_ratio(real, syn, 1.0)
    mix = X.mix_ratio(real, syn, 1.0, allow_repeats=True)
    assert X.composition(mix)["n_synthetic"] == 10
    assert mix.loc[mix["synthetic"], "item_id"].value_counts().max() == 3  # each pass covers the pool
    with pytest.raises(ValueError, match="no synthetic dataset"):
        X.mix_ratio(real, None, 0.5)
    assert len(X.mix_ratio(real, None, 0.0)) == 10


def test_scarcity_nested_stratified_and_modes():
    labels = [0] * 12 + [1] * 6 + [2] * 2
    real, syn = _table(20, False, labels), _table(10, True, [1] * 5 + [2] * 5, prefix="s")
    subs = {f: set(X.real_subset(real, f, 3, "subtype_id")["item_id"]) for f in (1.0, 0.5, 0.2, 0.1)}
    assert subs[0.1] <= subs[0.2] <= subs[0.5] <= subs[1.0] and len(subs[1.0]) == 20
    small = X.real_subset(real, 0.1, 3, "subtype_id")
    assert sorted(small["subtype_id"].unique()) == [0, 1, 2]  # every class kept
    cells = X.scarcity_sets(real, syn, (1.0, 0.5, 0.0), seed=3, stratify="subtype_id")
    assert (0.0, "proportional") not in cells  # 0 real x proportional is empty
    assert X.composition(cells[(0.0, "full")]) ["n_synthetic"] == 10
    assert X.composition(cells[(0.0, "full")])["n_real"] == 0
    # proportional: half of each synthetic class, rounded half up (2.5 -> 3 per class)
    assert X.composition(cells[(0.5, "proportional")])["n_synthetic"] == 6
    assert X.composition(cells[(1.0, "full")])["n"] == 30


def test_balance_minority_classes():
    real = _table(10, False, [0] * 7 + [1] * 2 + [2])
    syn = _table(12, True, [1] * 3 + [2] * 9, prefix="s")
    mix, rep = X.balance_classes(real, syn, "subtype_id", seed=0, classes=(0, 1, 2))
    assert rep[1] == {"real": 2, "synthetic_added": 3, "synthetic_available": 3, "total": 5}
    assert rep[2]["total"] == 7 and rep[0]["synthetic_added"] == 0
    assert mix["subtype_id"].value_counts().to_dict() == {0: 7, 2: 7, 1: 5}
    bad = _table(2, True, [7, 0], prefix="s")
    with pytest.raises(ValueError, match=r"unknown subtype_id values \[7\]"):
        X.balance_classes(real, bad, "subtype_id", classes=(0, 1, 2))


def test_guard_catches_a_real_test_patient(real_root):
    train = real_items(real_root, "volume", ("train",))
    test = real_items(real_root, "volume", ("test",))
    held = heldout_patients(real_root)
    assert held == set(test["patient_id"]) and not held & set(train["patient_id"])
    X.check_no_leak(train, held)  # clean
    with pytest.raises(ValueError, match="real items of held-out patients FAKE-009") as err:
        X.check_no_leak(pd.concat([train, test.iloc[[1]]]), held)
    assert "train on the train split only" in str(err.value) and "--conditions" not in str(err.value)


def test_guard_catches_a_leak_through_synthetic_provenance(cfg, real_root, synthetic_heldout, synthetic_train):
    held = heldout_patients(real_root)
    ok = synthetic_items(synthetic_train, "volume", real_root)
    assert ok["condition_patient"].isin(set(real_items(real_root, "volume")["patient_id"])).all()
    X.check_no_leak(ok, held)
    bad = synthetic_items(synthetic_heldout, "nodule", real_root)
    assert set(bad["condition_patient"]) == {"FAKE-008", "FAKE-009", "FAKE-010"}
    with pytest.raises(ValueError, match=r"conditioned on held-out patients FAKE-008, FAKE-009, FAKE-010.*"
                                         r"syn-noisycopy-00000"):
        X.check_no_leak(bad, held)
    # the pools refuse it before any training
    with pytest.raises(ValueError, match="test-patient leak in the synthetic pool"):
        load_pools(cfg, "volume", [synthetic_train, synthetic_heldout], real_root)
    # a condition split named test is caught even when the patient id is unknown
    bad2 = bad.assign(condition_patient=None)
    with pytest.raises(ValueError, match="condition split test"):
        X.check_no_leak(bad2, held)


def test_pools_refuse_a_generator_trained_on_a_scored_patient(cfg, real_root, synthetic_train, tmp_path):
    """Samples conditioned on training masks still leak when their generator trained on a test patient."""
    import shutil

    from synth_fakes import NoisyCopy, stamp_generator

    from lungsynth.data import fingerprint
    from lungsynth.sampling.synth import synthesize

    load_pools(cfg, "volume", [synthetic_train], real_root)  # a generator of the train split only: fine
    leaky_gen = stamp_generator(tmp_path / "gen", real_root, trained_on=("train", "test"))
    out = tmp_path / "leaky"
    synthesize(cfg, NoisyCopy("volume"), 2, conditions="sampler", out=out, checkpoint=leaky_gen, real_root=real_root,
               progress=False, model="model")
    with pytest.raises(fingerprint.PatientOverlap, match=r"generator of the synthetic pool .*leaky.*FAKE-008"):
        load_pools(cfg, "volume", [synthetic_train, out], real_root)
    unknown = Path(shutil.copytree(synthetic_train, tmp_path / "unknown"))
    fingerprint.write_stamp(unknown, {**fingerprint.read_stamp(unknown), "trained_on": None})
    with pytest.raises(fingerprint.DataMismatch, match="records no training patients"):
        load_pools(cfg, "volume", [unknown], real_root)


def test_validation_split_holds_out_whole_patients_of_every_class():
    labels = [0] * 30 + [1] * 12 + [2] * 18
    t = _table(60, 0, labels)
    t["patient_id"] = [f"P{i // 2}" for i in range(60)]  # two nodules a patient
    fit, val = X.validation_split(t, 0.2, seed=3, stratify="subtype_id")
    assert len(fit) + len(val) == 60 and not set(fit["item_id"]) & set(val["item_id"])
    assert not set(fit["patient_id"]) & set(val["patient_id"])  # a patient never straddles the split
    assert 0.15 <= len(val) / 60 <= 0.25
    assert set(val["subtype_id"]) == {0, 1, 2}  # stratified: every class validated
    again = X.validation_split(t, 0.2, seed=3, stratify="subtype_id")[1]
    assert again["item_id"].tolist() == val["item_id"].tolist()
    assert X.validation_split(t, 0.2, seed=4, stratify="subtype_id")[1]["item_id"].tolist() != val["item_id"].tolist()
    assert len(X.validation_split(t, 0.0)[1]) == 0
    with pytest.raises(ValueError, match="needs >= 5 training patients, got 3"):
        X.validation_split(t.iloc[:6], 0.2)


def test_the_folds_of_one_seed_tile_the_patients():
    """Five-fold cross-validation: folds 0..4 of one seed validate every nodule exactly once, whole patients."""
    t = _table(60, 0, [0] * 30 + [1] * 12 + [2] * 18)
    t["patient_id"] = [f"P{i // 2}" for i in range(60)]
    vals = [X.validation_split(t, 0.2, seed=3, stratify="subtype_id", fold=k)[1] for k in range(5)]
    ids = [i for v in vals for i in v["item_id"]]
    assert sorted(ids) == sorted(t["item_id"]) and len(ids) == len(set(ids))  # each item validated once
    assert vals[0]["item_id"].tolist() == X.validation_split(t, 0.2, seed=3, stratify="subtype_id")[1]["item_id"].tolist()
    unstratified = [set(X.validation_split(t, 0.2, seed=3, fold=k)[1]["patient_id"]) for k in range(5)]
    assert set().union(*unstratified) == set(t["patient_id"]) and sum(map(len, unstratified)) == 30
    with pytest.raises(ValueError, match="there are 5 folds"):
        X.validation_split(t, 0.2, seed=3, fold=5)
