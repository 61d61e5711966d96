"""Chapter 11: a few DenseNet121 steps on tiny data: subtype, scarcity, malignancy; the CLI."""

import numpy as np
import pandas as pd
import pytest
from scipy.stats import mannwhitneyu
from sklearn.metrics import average_precision_score, roc_auc_score

from lungsynth.cli import main
from lungsynth.downstream.classification import malignancy_label, plot_pr_curves, run_classification


def test_malignancy_labels_leave_3_out():
    assert [malignancy_label(s) for s in (1, 2, 3, 4, 5, float("nan"))] == [0, 0, None, 1, 1, None]


def test_classification_experiments(cfg, real_root, synthetic_train, tmp_path):
    res = run_classification(cfg, [synthetic_train], real_root=real_root, out=tmp_path / "cls")
    comp = res.composition.set_index("setting")
    assert comp.loc["real", "n_synthetic"] == 0
    # balanced: every minority subtype topped up towards the largest real class (5 solid) from the synthetic pool
    pool = pd.read_csv(synthetic_train / "nodules.csv")["subtype_id"].value_counts()
    real = {0: 5, 1: 1, 2: 2}
    want = [5] + [real[c] + min(5 - real[c], int(pool.get(c, 0))) for c in (1, 2)]
    assert comp.loc["balanced", ["n_subtype_id_0", "n_subtype_id_1", "n_subtype_id_2"]].tolist() == want
    assert want != [5, 1, 2]  # the pool does add minority nodules
    st = res.subtype_table
    assert set(st["setting"]) == {"real", "balanced"}
    assert set(st["size"]) == {"all", "6-10", "10-20", "20-30"}
    allrows = st[st["size"] == "all"]
    assert allrows["auroc_n"].eq(2).all()  # two runs each
    # the reported numbers are those of the runs' predictions, recomputed here by sklearn and scipy
    runs = res.subtype_runs[res.subtype_runs["size"] == "all"]
    assert len(runs) == 2 * 2 * 3  # settings x seeds x classes
    for (setting, seed), g in runs.groupby(["setting", "seed"]):
        y, proba = res.curves[("subtype", setting, seed)]
        assert np.bincount(y).tolist() == [2, 2, 2]  # the test split: FAKE-008..013, subtypes 0,1,2,0,1,2
        for _, r in g.iterrows():
            assert r["auroc"] == pytest.approx(roc_auc_score(y == r["class_id"], proba[:, r["class_id"]]))
            assert r["auprc"] == pytest.approx(average_precision_score(y == r["class_id"], proba[:, r["class_id"]]))
    for _, row in allrows.iterrows():
        def per_run(setting):
            return runs.loc[(runs["setting"] == setting) & (runs["class"] == row["class"]), "auroc"].to_numpy(float)

        assert row["auroc_mean"] == pytest.approx(per_run(row["setting"]).mean())
        a, b = per_run("balanced"), per_run("real")
        same = np.all(np.concatenate([a, b]) == a[0])  # identical constants: no evidence, p = 1 by definition
        assert row["p_auroc"] == pytest.approx(1.0 if same else mannwhitneyu(a, b, alternative="two-sided").pvalue)
    cells = set(zip(res.scarcity_table["real_fraction"], res.scarcity_table["synthetic"]))
    assert cells == {(0.5, "real"), (0.5, "proportional"), (0.5, "full"), (0.0, "full")}
    assert {"auprc_part-solid", "auroc_part-solid"} <= set(res.scarcity_runs.columns)  # the paper's Fig. 7 curve
    mal = res.malignancy_runs
    # the paper's three arms: scratch, from the imbalanced subtype model, from the balanced one
    assert set(mal["init"]) == {"scratch", "subtype (real)", "subtype (balanced)"} and len(mal) == 6
    assert mal["n_eval"].eq(5).all()  # test malignancy 1,4,2,5,4 (the 3 left out)
    for _, r in mal.iterrows():  # malignant (1) against benign, from the run's own predictions
        y, proba = res.curves[("malignancy", r["init"], r["seed"])]
        assert r["auroc"] == pytest.approx(roc_auc_score(y == 1, proba[:, 1]))
    mt = res.malignancy_table.set_index("init")

    def p_between(k1, k2):
        a, b = (mal.loc[mal["init"] == k, "auroc"].to_numpy(float) for k in (k1, k2))
        same = np.all(np.concatenate([a, b]) == a[0])
        return 1.0 if same else mannwhitneyu(a, b, alternative="two-sided").pvalue

    assert mt["compares"].eq("subtype (balanced) vs subtype (real)").all()
    assert mt["p_auroc"].tolist() == pytest.approx([p_between("subtype (balanced)", "subtype (real)")] * 3)
    assert mt.loc["subtype (real)", "p_auroc_vs_scratch"] == pytest.approx(p_between("subtype (real)", "scratch"))
    assert np.isnan(mt.loc["scratch", "p_auroc_vs_scratch"])
    assert ("subtype", "balanced", cfg.seed) in res.curves
    assert (tmp_path / "cls" / "subtype_table.csv").is_file()
    axes = plot_pr_curves(res, "subtype")
    assert len(axes) == 3 and axes[0].get_lines()  # curves plus the chance line
    assert len(plot_pr_curves(res, "malignancy")) == 1


def test_cli(real_root, synthetic_train, tmp_path, capsys):
    base = ["downstream", "cls", "--real-root", str(real_root), "--set", "downstream.eval_splits=test",
            "--set", "downstream.cls_crop_size=16", "--set", "downstream.cls_blocks=1,1",
            "--set", "downstream.cls_steps=1",
            "--set", "downstream.cls_init_features=4", "--set", "downstream.cls_growth_rate=4",
            "--set", "downstream.val_fraction=0"]
    assert main(base + ["--synthetic", str(tmp_path / "missing")]) == 2
    assert "missing not found" in capsys.readouterr().err
    assert main(base + ["--synthetic", str(synthetic_train), "--experiments", "subtype", "--runs", "1",
                        "--ratio", "0,1", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "subtype_table" in out and "ratio_table" in out
    ratio = pd.read_csv(tmp_path / "o" / "ratio_runs.csv")
    assert ratio.groupby("ratio")["n_synthetic"].first().to_dict() == {0.0: 0, 1.0: 8}  # 1 x 8 real nodules
    with pytest.raises(SystemExit):
        main(["downstream", "seg", "--ratio"])
    assert main(["downstream", "seg", "--real-root", str(real_root), "--ratio", "x"]) == 2


def test_early_stopping_validates_on_real_patients_that_no_classifier_trains_on(cfg, real_root, synthetic_train,
                                                                                 tiny, monkeypatch):
    """Each run holds out whole real training patients (the paper's 80/20 split): no training set of that run,
    balanced or scarce, holds one of them, the validation set is real only, and each model reports the step
    its weights come from."""
    import lungsynth.downstream.classification as C
    from lungsynth.config import get_config

    seen = []
    train = C.train_classifier

    def spy(cfg_, dataset, n_classes, seed=0, init=None, steps=None, validation=None):
        seen.append((seed, dataset.base.table, validation.base.table if validation is not None else None))
        return train(cfg_, dataset, n_classes, seed, init, steps, validation)

    monkeypatch.setattr(C, "train_classifier", spy)
    small = get_config("smoke", {**tiny, "downstream.val_fraction": 0.25, "downstream.cls_steps": 4,
                                 "downstream.cls_val_every": 2})
    res = C.run_classification(small, [synthetic_train], experiments=("subtype", "scarcity"), real_root=real_root)
    assert len(seen) == 2 * 2 + 4  # two settings x two runs, four scarcity cells
    for seed, table, val in seen:
        assert val is not None and len(val) and not val["synthetic"].astype(bool).any()
        assert not set(table.loc[~table["synthetic"].astype(bool), "patient_id"]) & set(val["patient_id"])
    vals = {seed: set(val["patient_id"]) for seed, _, val in seen}
    assert vals[0] != vals[1]  # a new split each run
    assert res.subtype_runs["best_step"].isin([2, 4]).all()
    assert "validation (real)" in set(res.composition["setting"])


def test_cross_validation_runs_validate_on_the_folds_of_one_partition(tiny, real_root, synthetic_train, monkeypatch):
    """``cls_cross_validation`` (HR-LDM §5.3, on in `full`): run k validates on fold k of one partition of the
    training patients, so the runs' validation patients never overlap; more runs than folds is refused."""
    import lungsynth.downstream.classification as C
    from lungsynth.config import get_config
    from lungsynth.downstream.common import load_pools
    from lungsynth.downstream.mixing import validation_split

    seen, train = {}, C.train_classifier

    def spy(cfg_, dataset, n_classes, seed=0, init=None, steps=None, validation=None):
        seen.setdefault(seed, set(validation.base.table["patient_id"]))
        return train(cfg_, dataset, n_classes, seed, init, steps, validation)

    monkeypatch.setattr(C, "train_classifier", spy)
    cv = get_config("smoke", {**tiny, "downstream.val_fraction": 0.25, "downstream.cls_cross_validation": True,
                              "downstream.cls_steps": 2, "downstream.cls_val_every": 1})
    C.run_classification(cv, [synthetic_train], experiments=("subtype",), real_root=real_root)
    real = C.sized_pools(load_pools(cv, "nodule", [synthetic_train], real_root), cv.downstream.cls_size_range_mm)[0]
    folds = [set(validation_split(real.train, 0.25, cv.seed, "subtype_id", fold=k)[1]["patient_id"]) for k in (0, 1)]
    assert [seen[cv.seed], seen[cv.seed + 1]] == folds and not folds[0] & folds[1]
    with pytest.raises(ValueError, match="set downstream.n_runs <= 4"):
        C.run_fold(cv, cv.seed + 4)
    assert C.run_fold(get_config("smoke", tiny), 7) == (7, 0)  # off: each run its own partition


def test_only_nodules_of_the_size_range_are_read(cfg, real_root, synthetic_train):
    """HR-LDM reads the 6-30 mm nodules: real train, evaluation and synthetic rows outside the range are left out and
    counted; rows of unknown diameter stay."""
    from lungsynth.downstream.classification import sized_pools
    from lungsynth.downstream.common import load_pools

    pools = load_pools(cfg, "nodule", [synthetic_train], real_root)
    sized, left_out = sized_pools(pools, (8.0, 20.0))
    for name in ("train", "evaluation", "synthetic"):
        d = getattr(sized, name)["diameter_mm"].astype(float)
        assert (((d >= 8) & (d <= 20)) | ~np.isfinite(d) | (d <= 0)).all()
    # train FAKE-000..007: 7, 12, 25, 8, 15, 9, 22, 11 mm; test FAKE-008..013: 7.5, 12.5, 21, 8.5, 14, 26
    assert sorted(left_out["left out: real train outside 8-20 mm"]["diameter_mm"]) == [7.0, 22.0, 25.0]
    assert sorted(left_out["left out: real evaluation outside 8-20 mm"]["diameter_mm"]) == [7.5, 21.0, 26.0]
    assert len(sized.train) == 5 and len(sized.evaluation) == 3
    assert sized_pools(pools, ())[0] is pools  # () reads every size
    with pytest.raises(ValueError, match="no evaluation nodule of 40-50 mm"):
        sized_pools(pools, (40.0, 50.0))


def test_two_synthetic_datasets_are_compared_as_separate_arms(cfg, real_root, synthetic_train, tmp_path,
                                                              monkeypatch):
    """``SYNTHETIC = [A, B]``: each dataset balances, tops up and initialises its own arms (named ``... [A]``),
    beside one real arm, each with its own p-value against real; no training set mixes the two."""
    from synth_fakes import NoisyCopy, stamp_generator

    import lungsynth.downstream.classification as C
    from lungsynth.sampling.synth import synthesize

    other = tmp_path / "other"
    synthesize(cfg, NoisyCopy("volume", noise_hu=60.0), 8, conditions="sampler", out=other, progress=False,
               checkpoint=stamp_generator(tmp_path / "gen", real_root), real_root=real_root, model="model")
    seen, train = [], C.train_classifier

    def spy(cfg_, dataset, n_classes, seed=0, init=None, steps=None, validation=None):
        table = dataset.base.table
        synthetic = table[table["synthetic"].astype(bool)]
        seen.append(set(synthetic["generator"]) if len(synthetic) else set())
        return train(cfg_, dataset, n_classes, seed, init, steps, validation)

    monkeypatch.setattr(C, "train_classifier", spy)
    res = C.run_classification(cfg, [synthetic_train, other], real_root=real_root, n_runs=2)
    a, b = f"balanced [{synthetic_train.name}]", "balanced [other]"
    assert set(res.subtype_table["setting"]) == {"real", a, b}
    assert all(len(g) <= 1 for g in seen)  # no training set draws from both datasets
    assert {frozenset(g) for g in seen} == {frozenset(), frozenset({synthetic_train.name}), frozenset({"other"})}
    runs = res.subtype_runs[res.subtype_runs["size"] == "all"]
    st = res.subtype_table[res.subtype_table["size"] == "all"]
    for setting in (a, b):
        for _, row in st[st["setting"] == setting].iterrows():
            x, y = (runs.loc[(runs["setting"] == s) & (runs["class"] == row["class"]), "auroc"].to_numpy(float)
                    for s in (setting, "real"))
            same = np.all(np.concatenate([x, y]) == x[0])
            assert row["p_auroc"] == pytest.approx(1.0 if same else mannwhitneyu(x, y, alternative="two-sided").pvalue)
    assert st.loc[st["setting"] == "real", "p_auroc"].isna().all()  # two comparisons: none is the real row's
    modes = set(res.scarcity_table["synthetic"])
    assert {"real", f"full [{synthetic_train.name}]", "full [other]", "proportional [other]"} <= modes
    mt = res.malignancy_table.set_index("init")
    assert set(mt.index) == {"scratch", "subtype (real)", f"subtype ({a})", f"subtype ({b})"}
    assert mt.loc[f"subtype ({b})", "compares"] == f"subtype ({b}) vs subtype (real)"


def test_a_killed_run_resumes_with_the_trainings_it_had_finished(cfg, tiny, real_root, synthetic_train, tmp_path,
                                                                  monkeypatch):
    """Each finished training is kept under ``<out>/trainings``: after a kill mid-run the same command trains only
    what was left and reports the numbers of an uninterrupted run; a changed setting trains again."""
    import lungsynth.downstream.classification as C
    from lungsynth.config import get_config

    trained = []
    train = C.train_classifier

    def counting(*args, **kwargs):
        if len(trained) == kill_after:
            raise KeyboardInterrupt  # the run is killed here
        trained.append(args[2])  # n_classes
        return train(*args, **kwargs)

    monkeypatch.setattr(C, "train_classifier", counting)
    exps = ("subtype", "malignancy")
    kill_after = 3  # of 2 seeds x (real, balanced) subtype and 2 x 3 malignancy trainings
    with pytest.raises(KeyboardInterrupt):
        C.run_classification(cfg, [synthetic_train], experiments=exps, real_root=real_root, out=tmp_path / "cls")
    kill_after = -1
    trained.clear()
    resumed = C.run_classification(cfg, [synthetic_train], experiments=exps, real_root=real_root,
                                   out=tmp_path / "cls")
    assert resumed.trainings_reused == 3 and len(trained) == 10 - 3
    whole = C.run_classification(cfg, [synthetic_train], experiments=exps, real_root=real_root, out=None)
    for name in ("subtype_runs", "malignancy_runs"):
        pd.testing.assert_frame_equal(getattr(resumed, name), getattr(whole, name))
    trained.clear()
    again = C.run_classification(cfg, [synthetic_train], experiments=exps, real_root=real_root, out=tmp_path / "cls")
    assert not trained and again.trainings_reused == 10
    longer = get_config("smoke", {**tiny, "downstream.cls_steps": int(cfg.downstream.cls_steps) + 1})
    C.run_classification(longer, [synthetic_train], experiments=("subtype",), real_root=real_root,
                         out=tmp_path / "cls")
    assert len(trained) == 4  # another step budget: every training again
