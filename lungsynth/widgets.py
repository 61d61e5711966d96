"""Interactive views for the notebooks (ipywidgets), safe in headless runs.

The widgets draw with matplotlib's Agg backend into an ``ipywidgets.Image``, so the first
frame is stored in the notebook even when nothing renders the widget (papermill, nbval);
when ipywidgets is missing they fall back to a static figure.
"""

from __future__ import annotations

import io
from typing import Any, Mapping

import numpy as np


def _png(image: np.ndarray, masks: Mapping[str, np.ndarray], window: tuple[float, float] | None,
         title: str, size: float) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lungsynth.viz import overlay

    fig = Figure(figsize=(size, size))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 0.93))
    overlay(ax, image, masks, window=window)
    ax.set_title(title, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()


def slice_browser(volume: Any, masks: Mapping[str, Any] | None = None, axis: int = 0,
                  window: tuple[float, float] | None = None, size: float = 4.0, index: int | None = None) -> Any:
    """A slider over the slices of ``volume`` [D, H, W] along ``axis`` with mask contours.

    A second slider moves through the axes (0 axial, 1 coronal, 2 sagittal). Returns the widget
    (display it as a cell's last expression), or a static figure without ipywidgets.
    """
    from lungsynth.viz import show_slices, to_numpy

    vol = to_numpy(volume)
    ms = {k: to_numpy(v) for k, v in (masks or {}).items()}
    try:
        import ipywidgets as w
    except ImportError:
        return show_slices(vol, ms, axis=axis, window=window)
    start = vol.shape[axis] // 2 if index is None else int(index)
    if index is None and ms:
        ref = next(iter(ms.values()))
        if ref.any():
            start = int(np.argwhere(ref > 0.5)[:, axis].mean().round())
    view = w.Image(format="png")
    pos = w.IntSlider(value=start, min=0, max=vol.shape[axis] - 1, description="slice",
                      continuous_update=False)
    ax_pick = w.ToggleButtons(options=[("axial", 0), ("coronal", 1), ("sagittal", 2)], value=axis)

    def draw(*_: Any) -> None:
        a, i = ax_pick.value, min(pos.value, vol.shape[ax_pick.value] - 1)
        view.value = _png(np.take(vol, i, axis=a), {k: np.take(m, i, axis=a) for k, m in ms.items()},
                          window, f"{['axial', 'coronal', 'sagittal'][a]} {i}/{vol.shape[a] - 1}", size)

    def on_axis(change: Any) -> None:
        pos.max = vol.shape[change["new"]] - 1
        pos.value = vol.shape[change["new"]] // 2
        draw()

    pos.observe(draw, names="value")
    ax_pick.observe(on_axis, names="value")
    draw()
    return w.VBox([ax_pick, pos, view])


def niivue_view(ct_path: Any, mask_paths: Mapping[str, Any] | None = None, window: tuple[float, float] = (-1000, 400),
                height: int = 400) -> Any:
    """An ipyniivue 3D/multiplanar view of a NIfTI CT with optional mask overlays (offline)."""
    import ipyniivue

    nv = ipyniivue.NiiVue(height=height) if "height" in ipyniivue.NiiVue.class_trait_names() else ipyniivue.NiiVue()
    vols = [{"path": str(ct_path), "colormap": "gray", "cal_min": window[0], "cal_max": window[1]}]
    cmaps = ["green", "red", "blue", "warm"]
    for n, (name, p) in enumerate((mask_paths or {}).items()):
        vols.append({"path": str(p), "colormap": cmaps[n % len(cmaps)], "opacity": 0.5, "cal_min": 0.5,
                     "cal_max": 1.5})
    nv.load_volumes(vols)
    return nv
