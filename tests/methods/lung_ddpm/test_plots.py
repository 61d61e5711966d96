"""Chapter 06, Lung-DDPM's plots room: the side-by-side and consecutive-slice figures."""

from __future__ import annotations

from lung_ddpm_toys import toy_batch

from lungsynth.methods import lung_ddpm as ld
from lungsynth.methods.lung_ddpm import plots


def test_figures_show_reference_layout_samples_and_consecutive_slices(toy_data):
    import matplotlib.pyplot as plt

    ct, layout = toy_batch(toy_data, 1)
    k = plots._centre_index(layout[0])
    per_slice = (layout[0, 0] == 2).sum(dim=(1, 2))
    assert per_slice[k] == per_slice.max() > 0  # the slice with the most nodule voxels
    fig = ld.figure_side_by_side(ct[0], layout[0], {"AAS": ct[0], "w/o AAS": ct[0]})
    assert len([a for a in fig.axes if a.get_title()]) == 4
    fig2 = ld.figure_consecutive_slices({"reference": ct[0], "sample": ct[0]}, layout[0], n=3)
    assert [a.get_title() for a in fig2.axes[:3]] == [f"reference z={z}" for z in (k - 1, k, k + 1)]
    assert len(fig2.axes) == 6
    plt.close("all")
