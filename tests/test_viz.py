"""Shared figures: the data source printed on every figure once a chapter has named it; MDS of feature sets."""

import matplotlib
import pytest

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from lungsynth import viz  # noqa: E402


def test_every_new_figure_names_its_data_source_until_switched_off():
    try:
        viz.label_figures("LIDC-IDRI")
        fig, _ = plt.subplots(1, 2)
        assert [t.get_text() for t in fig.texts] == ["data: LIDC-IDRI"]
        viz.label_figures("phantom")  # switching source replaces the label, never stacks two
        assert [t.get_text() for t in plt.figure().texts] == ["data: phantom"]
    finally:
        viz.label_figures(None)
        plt.close("all")
    assert plt.figure().texts == []
    plt.close("all")


def test_mds_keeps_far_groups_apart_and_near_groups_together():
    import numpy as np

    from lungsynth.viz import mds_embedding, mds_figure

    rng = np.random.default_rng(0)
    groups = {"real": rng.normal(0, 1, (10, 16)), "far": rng.normal(5, 1, (10, 16)),
              "near": rng.normal(0.2, 1, (10, 16))}
    xy = mds_embedding(groups)
    assert {k: v.shape for k, v in xy.items()} == {k: (10, 2) for k in groups}
    centre = {k: v.mean(0) for k, v in xy.items()}
    assert np.linalg.norm(centre["real"] - centre["far"]) > 5 * np.linalg.norm(centre["real"] - centre["near"])
    fig = mds_figure(groups)
    assert len(fig.axes[0].patches) == 3  # one ellipse per group
    with pytest.raises(ValueError, match="widths"):
        mds_embedding({"a": np.zeros((3, 4)), "b": np.zeros((3, 5))})


def test_covariance_ellipse_of_a_known_point_set():
    import numpy as np

    from lungsynth.viz import covariance_ellipse

    centre, width, height, angle = covariance_ellipse(np.array([[0, 0], [2, 0], [0, 1], [2, 1.0]]))
    assert np.allclose(centre, [1.0, 0.5])
    assert width == pytest.approx(4 * np.sqrt(4 / 3)) and height == pytest.approx(4 * np.sqrt(1 / 3))
    assert abs(angle) % 180 == pytest.approx(0.0, abs=1e-6)
    assert covariance_ellipse(np.zeros((2, 2))) is None
