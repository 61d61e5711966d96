"""Shared figures: the data source printed on every figure once a chapter has named it."""

import matplotlib

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
