"""Chapter 10: a few AttentionUnet steps on tiny data, real only and with synthetic data."""

import numpy as np
import pytest

from lungsynth.downstream.segmentation import build_segmenter, input_size, run_segmentation


def test_segmentation_trains_and_reports(cfg, real_root, synthetic_train, tmp_path):
    res = run_segmentation(cfg, str(synthetic_train), ratios=(0.0, 0.5), n_runs=1, real_root=real_root,
                           out=tmp_path / "seg")
    runs = res.runs
    assert len(runs) == 2 * 2  # settings x ratios (one seed; runs over seeds: test_classification)
    for col in ("dice", "sensitivity", "specificity"):
        v = runs[col].to_numpy(float)
        assert np.all((v >= 0) & (v <= 1)), col
    vol = runs[runs["setting"] == "volume"]
    assert vol.loc[vol["ratio"] == 0.0, "n_synthetic"].eq(0).all()
    assert vol.loc[vol["ratio"] == 0.5, "n_synthetic"].eq(4).all()  # 0.5 x 8 real volumes
    assert len(res.items) == 2 * (6 + 6)  # 6 test volumes and 6 test nodules per ratio
    assert set(res.table.columns) >= {"setting", "ratio", "dice_mean", "dice_std", "dice_n"}
    assert (tmp_path / "seg" / "seg_table.csv").is_file() and (tmp_path / "seg" / "run.json").is_file()


def test_real_only_and_bad_sizes(cfg, real_root):
    res = run_segmentation(cfg, None, settings=("crop",), n_runs=1, real_root=real_root)
    assert res.runs["ratio"].tolist() == [0.0] and res.runs["n_synthetic"].tolist() == [0]
    with pytest.raises(ValueError, match="divisible by 2"):
        input_size(type(cfg)(**{**cfg.__dict__, "downstream": type(cfg.downstream)(
            **{**cfg.downstream.__dict__, "seg_crop_size": 15})}), "crop")
    out = build_segmenter(cfg)(__import__("torch").zeros(1, 1, 16, 16, 16))
    assert out.shape == (1, 2, 16, 16, 16)
