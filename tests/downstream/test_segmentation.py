"""Chapter 10: a few AttentionUnet steps on tiny data, real only and with synthetic data."""

import copy
import importlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lungsynth.downstream.segmentation import build_segmenter, input_size, run_segmentation

SEG = importlib.import_module("lungsynth.downstream.segmentation")


def _by_hand(pred, target):
    """Dice, sensitivity, specificity of two boolean volumes, straight from the voxel counts."""
    tp, fp = np.sum(pred & target), np.sum(pred & ~target)
    fn, tn = np.sum(~pred & target), np.sum(~pred & ~target)
    return {"dice": 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn),
            "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
            "specificity": tn / (tn + fp) if tn + fp else float("nan")}


def _recording_predict(monkeypatch, replace=None):
    """Patch the segmenter's ``predict``: record (prediction, target) per evaluated item; ``replace(target)``
    swaps the network's prediction for a known one."""
    seen, real = [], SEG.predict

    def predict(model, dataset, batch_size=2):
        preds = real(model, dataset, batch_size)
        targets = [dataset[i]["target"][0].numpy() > 0.5 for i in range(len(dataset))]
        if replace is not None:
            preds = [replace(t) for t in targets]
        seen.extend(zip(preds, targets))
        return preds

    monkeypatch.setattr(SEG, "predict", predict)
    return seen


def test_segmentation_trains_and_reports(cfg, real_root, synthetic_train, tmp_path, monkeypatch):
    seen = _recording_predict(monkeypatch)
    res = run_segmentation(cfg, str(synthetic_train), ratios=(0.0, 0.5), n_runs=1, real_root=real_root,
                           out=tmp_path / "seg")
    runs = res.runs
    assert len(runs) == 2 * 2  # settings x ratios (one seed; runs over seeds: test_classification)
    # per item, the reported metrics are those of the network's own prediction, counted by hand here;
    # per run, their means over the run's items
    assert len(seen) == len(res.items)
    want = pd.DataFrame([_by_hand(p, t) for p, t in seen])
    for col in ("dice", "sensitivity", "specificity"):
        assert res.items[col].to_numpy(float) == pytest.approx(want[col].to_numpy(float), nan_ok=True), col
        means = res.items.groupby(["setting", "ratio", "seed"], sort=False)[col].mean()
        assert runs[col].to_numpy(float) == pytest.approx(means.to_numpy(float), nan_ok=True), col
    vol = runs[runs["setting"] == "volume"]
    assert vol.loc[vol["ratio"] == 0.0, "n_synthetic"].eq(0).all()
    assert vol.loc[vol["ratio"] == 0.5, "n_synthetic"].eq(4).all()  # 0.5 x 8 real volumes
    assert len(res.items) == 2 * (6 + 6)  # 6 test volumes and 6 test nodules per ratio
    assert set(res.table.columns) >= {"setting", "ratio", "dice_mean", "dice_std", "dice_n"}
    assert (tmp_path / "seg" / "seg_table.csv").is_file() and (tmp_path / "seg" / "run.json").is_file()


def _shifted(target):
    """A known prediction: the target moved one voxel along the first axis, plus one false-positive voxel."""
    pred = np.roll(target, 1, axis=0)
    pred[0, 0, 0] = True
    return pred


def test_real_only_and_bad_sizes(cfg, real_root, monkeypatch):
    seen = _recording_predict(monkeypatch, replace=_shifted)
    crop_only = copy.deepcopy(cfg)
    crop_only.downstream.seg_settings = ("crop",)  # as `course` runs it: the default follows the profile
    res = run_segmentation(crop_only, None, n_runs=1, real_root=real_root)
    assert res.runs["setting"].tolist() == ["crop"]
    assert res.runs["ratio"].tolist() == [0.0] and res.runs["n_synthetic"].tolist() == [0]
    # a known overlap: Dice 2|P and T| / (|P| + |T|) by hand, strictly between 0 and 1 here
    assert len(seen) == len(res.items) == 6
    for (pred, target), (_, row) in zip(seen, res.items.iterrows()):
        want = _by_hand(pred, target)
        assert 0 < want["dice"] < 1 and 0 < want["sensitivity"] < 1
        assert [row["dice"], row["sensitivity"], row["specificity"]] == pytest.approx(
            [want["dice"], want["sensitivity"], want["specificity"]])
    assert res.runs["dice"].iloc[0] == pytest.approx(np.mean([_by_hand(p, t)["dice"] for p, t in seen]))
    with pytest.raises(ValueError, match="divisible by 2"):
        input_size(type(cfg)(**{**cfg.__dict__, "downstream": type(cfg.downstream)(
            **{**cfg.downstream.__dict__, "seg_crop_size": 15})}), "crop")
    out = build_segmenter(cfg)(__import__("torch").zeros(1, 1, 16, 16, 16))
    assert out.shape == (1, 2, 16, 16, 16)


def test_volume_setting_trains_on_patches_and_predicts_whole_volumes(tiny, real_root, monkeypatch):
    """With ``seg_volume_patch`` the volume network trains on patches for ``seg_volume_steps`` and is evaluated
    on whole volumes; the crop setting keeps its crops and ``seg_steps``."""
    from lungsynth.config import get_config
    from lungsynth.downstream import common

    cfg = get_config("smoke", {**tiny, "downstream.seg_volume_patch": 8, "downstream.seg_volume_steps": 3})
    trained, real_fit = [], common.fit

    def recording_fit(cfg_, model, loss_fn, dataset, steps, *args, **kwargs):
        trained.append((tuple(dataset[0]["image"].shape), steps))
        return real_fit(cfg_, model, loss_fn, dataset, steps, *args, **kwargs)

    monkeypatch.setattr(common, "fit", recording_fit)
    seen = _recording_predict(monkeypatch)
    run_segmentation(cfg, None, n_runs=1, real_root=real_root)
    assert trained == [((1, 8, 8, 8), 3), ((1, 16, 16, 16), 2)]  # volume patches, then crops
    assert {p.shape for p, _ in seen} == {(16, 16, 16)}  # whole volumes and whole crops predicted
    with pytest.raises(ValueError, match="seg_volume_patch 6 must be divisible"):
        run_segmentation(get_config("smoke", {**tiny, "downstream.seg_volume_patch": 6, "downstream.seg_channels": "4,8,16"}),
                         None, settings=("volume",), n_runs=1, real_root=real_root)


def test_loss_is_the_nodule_dice_plus_cross_entropy():
    """Predicting background everywhere scores the nodule class's full Dice loss (1), not the mean with the
    near-perfect background class (0.5: the plateau the segmenters sat on); a perfect prediction scores ~0."""
    import torch

    target = torch.zeros(2, 1, 8, 8, 8)
    target[0, 0, 2:6, 2:6, 2:6] = 1  # centred, so the random flips keep it; the second item has no nodule
    onehot = torch.cat([1 - target, target], 1)
    loss = SEG.seg_loss_fn()
    batch = {"image": torch.zeros(2, 1, 8, 8, 8), "target": target}
    background = float(loss(lambda x: torch.tensor([3.0, -3.0]).view(1, 2, 1, 1, 1).expand(2, 2, 8, 8, 8), batch))
    perfect = float(loss(lambda x: 40 * onehot - 20, batch))
    assert background >= 1.0 and perfect < 1e-3


@pytest.fixture(scope="module")
def cohort_root(tmp_path_factory):
    """8 training, 6 test and 3 validation patients (FAKE-014..016): the validation ones are the separate cohort."""
    from synth_fakes import make_fake_prepared

    return make_fake_prepared(tmp_path_factory.mktemp("ds_cohort"), n_train=8, n_test=6, n_val=3, size=16)


def test_cohort_arms_train_on_the_validation_patients_only(tiny, cohort_root, tmp_path, monkeypatch):
    """Lung-DDPM's Table I / III: the synthetic volumes are generated from the layouts of patients the segmenter
    neither trains nor is tested on, and the "+ real" arm adds those same patients' real volumes."""
    from synth_fakes import NoisyCopy, stamp_generator

    from lungsynth.config import get_config
    from lungsynth.downstream.common import ensure_synthetic
    from lungsynth.downstream.data import heldout_patients, synthetic_items

    cfg = get_config("smoke", {**tiny, "downstream.seg_condition_source": "validation",
                               "downstream.synthetic_ratios": "0,0.5"})
    gen = stamp_generator(tmp_path / "generator", cohort_root)
    pool = ensure_synthetic(cfg, NoisyCopy("volume"), out=tmp_path / "syn", unit="volume", real_root=cohort_root,
                            checkpoint=gen, model="model")
    conditioned = set(synthetic_items(pool, "volume", cohort_root)["condition_patient"])
    train, test = heldout_patients(cohort_root, ("train",)), heldout_patients(cohort_root, ("test",))
    assert conditioned and conditioned <= heldout_patients(cohort_root, ("val",))
    assert not conditioned & (train | test)

    # a second generator's dataset on the same cohort: compared beside the first, never mixed into it
    other = ensure_synthetic(cfg, NoisyCopy("volume", noise_hu=60.0), out=tmp_path / "syn2", unit="volume",
                             real_root=cohort_root, checkpoint=gen, model="model")
    drawn_from, real_train = [], SEG.train_segmenter

    def recording_train(cfg_, dataset, seed=0, steps=None):
        table = dataset.table
        drawn_from.append(sorted(set(table.loc[table["synthetic"].astype(bool), "root"].map(lambda r: Path(r).name))))
        return real_train(cfg_, dataset, seed, steps)

    monkeypatch.setattr(SEG, "train_segmenter", recording_train)
    res = run_segmentation(cfg, f"{pool},{other}", settings=("crop",), n_runs=1, real_root=cohort_root)
    runs = res.runs.set_index(["arm", "generator", "ratio"])
    assert sorted(runs.index) == [("+ real", "", 0.375), ("+ synthetic", "syn", 0.375), ("+ synthetic", "syn", 0.5),
                                  ("+ synthetic", "syn2", 0.375), ("+ synthetic", "syn2", 0.5), ("real only", "", 0.0)]
    assert runs.loc[("+ real", "", 0.375), ["n_real", "n_synthetic"]].tolist() == [8 + 3, 0]  # the cohort's crops
    for g in ("syn", "syn2"):
        assert runs.loc[("+ synthetic", g, 0.375), ["n_real", "n_synthetic"]].tolist() == [8, 3]  # as many synthetic
        assert runs.loc[("+ synthetic", g, 0.5), "n_synthetic"] == 4
    assert sorted(map(tuple, drawn_from)) == [(), (), ("syn",), ("syn",), ("syn2",), ("syn2",)]
    assert len(res.table) == len(runs)  # one seed: one table row per arm

    # a pool generated from the training patients' layouts is refused, naming them
    layouts = tmp_path / "sampler"
    ensure_synthetic(get_config("smoke", tiny), NoisyCopy("volume"), n=2, out=layouts, unit="volume",
                     real_root=cohort_root, checkpoint=gen, model="model")
    with pytest.raises(ValueError, match="conditioned on training patients FAKE-00"):
        run_segmentation(cfg, str(layouts), settings=("crop",), n_runs=1, real_root=cohort_root)
    # and the cohort may not be a split the evaluation scores
    with pytest.raises(ValueError, match="eval_splits"):
        run_segmentation(get_config("smoke", {**tiny, "downstream.seg_condition_source": "validation",
                                              "downstream.eval_splits": "val,test"}),
                         str(pool), settings=("crop",), n_runs=1, real_root=cohort_root)


def test_a_rerun_reads_back_the_finished_trainings_and_reports_the_same(cfg, real_root, synthetic_train, tmp_path,
                                                                        monkeypatch):
    """A killed run resumes: the trainings finished before the kill are read back from ``<out>/trainings``, the
    rest trained, and the tables are those of an uninterrupted run."""
    trained = []
    train = SEG.train_segmenter

    def counting(*args, **kwargs):
        if len(trained) == kill_after:
            raise KeyboardInterrupt
        trained.append(1)
        return train(*args, **kwargs)

    monkeypatch.setattr(SEG, "train_segmenter", counting)
    kwargs = dict(ratios=(0.0, 0.5), n_runs=1, real_root=real_root, settings=("crop",))
    kill_after = 1
    with pytest.raises(KeyboardInterrupt):
        run_segmentation(cfg, str(synthetic_train), out=tmp_path / "seg", **kwargs)
    kill_after = -1
    resumed = run_segmentation(cfg, str(synthetic_train), out=tmp_path / "seg", **kwargs)
    assert resumed.trainings_reused == 1 and len(trained) == 2  # one before the kill, one after
    whole = run_segmentation(cfg, str(synthetic_train), out=None, **kwargs)
    pd.testing.assert_frame_equal(resumed.items, whole.items)
    pd.testing.assert_frame_equal(resumed.runs, whole.runs)


class _Items:
    """Items of one kind with given targets, and an all-zero image."""

    def __init__(self, kind, targets):
        self.kind, self.targets = kind, targets
        self.table = pd.DataFrame({"item_id": [f"n{i}" for i in range(len(targets))]})

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return {"image": torch.zeros(1, 8, 8, 8), "target": torch.from_numpy(self.targets[i][None].astype(np.float32))}


def test_a_crop_whose_nodule_left_no_voxel_has_no_dice():
    """A 3 mm nodule at 2.7 mm can vanish from its crop's mask: scoring it 1 (empty prediction) or 0 would be
    arbitrary, so its Dice is NaN and the means skip it; a whole volume without nodules keeps Dice 1."""
    from lungsynth.downstream.segmentation import evaluate_segmenter

    model = torch.nn.Conv3d(1, 2, 1)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([1.0, -1.0]))  # predicts background everywhere
    empty, nodule = np.zeros((8, 8, 8), bool), np.zeros((8, 8, 8), bool)
    nodule[3:5, 3:5, 3:5] = True
    crops = evaluate_segmenter(model, _Items("crop", [empty, nodule]))
    assert [r["empty_target"] for r in crops] == [True, False]
    assert np.isnan(crops[0]["dice"]) and crops[1]["dice"] == 0.0
    assert evaluate_segmenter(model, _Items("volume", [empty]))[0]["dice"] == 1.0
