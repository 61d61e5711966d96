"""Figures shared by every chapter: slices with mask overlays, grids, histograms.

Volumes are (D, H, W) arrays or tensors (a leading channel of 1 is dropped); HU or [0, 1]
images are both fine (``window`` sets the grey range). Every function returns the
matplotlib Figure so notebooks can save or further annotate it.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

MASK_COLOURS = ("#00e5ff", "#ff3d00", "#ffd600", "#76ff03", "#d500f9", "#2979ff")
LUNG_WINDOW_HU = (-1000.0, 400.0)


def to_numpy(x: Any) -> np.ndarray:
    """Tensor / array -> float numpy, dropping a leading singleton channel (and batch)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    x = np.asarray(x)
    while x.ndim > 2 and x.shape[0] == 1:
        x = x[0]
    return x


def _window(image: np.ndarray, window: tuple[float, float] | None) -> tuple[float, float]:
    if window is not None:
        return window
    lo, hi = float(np.min(image)), float(np.max(image))
    return (-1000.0, 400.0) if hi > 50 else (lo, hi if hi > lo else lo + 1)


def _slice(vol: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.take(vol, index, axis=axis)


def overlay(ax: Any, image: np.ndarray, masks: Mapping[str, np.ndarray] | None = None,
            window: tuple[float, float] | None = None, contour: bool = True, alpha: float = 0.35,
            aspect: float = 1.0) -> None:
    """Draw a 2D ``image`` [H, W] with ``masks`` ({name: [H, W]}) as contours or filled colours."""
    lo, hi = _window(image, window)
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
    for n, (name, m) in enumerate((masks or {}).items()):
        m = np.asarray(m)
        if not m.any():
            continue
        colour = MASK_COLOURS[n % len(MASK_COLOURS)]
        if contour and m.shape[0] > 1 and m.shape[1] > 1:
            ax.contour(m > 0.5, levels=[0.5], colors=[colour], linewidths=1.0)
        else:
            rgba = np.zeros(m.shape + (4,))
            rgba[m > 0.5] = list(_hex_rgb(colour)) + [alpha]
            ax.imshow(rgba, aspect=aspect, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _hex_rgb(colour: str) -> tuple[float, float, float]:
    c = colour.lstrip("#")
    return tuple(int(c[i:i + 2], 16) / 255 for i in (0, 2, 4))  # type: ignore[return-value]


def show_slices(volume: Any, masks: Mapping[str, Any] | None = None, indices: Sequence[int] | None = None,
                axis: int = 0, n: int = 4, window: tuple[float, float] | None = None, title: str | None = None,
                contour: bool = True, size: float = 3.0) -> Any:
    """``n`` slices (or ``indices``) of ``volume`` [D, H, W] along ``axis`` with mask overlays.

    Default indices are spread over the extent of the first mask (or the volume).
    """
    import matplotlib.pyplot as plt

    vol = to_numpy(volume)
    ms = {k: to_numpy(v) for k, v in (masks or {}).items()}
    if indices is None:
        ref = next(iter(ms.values()), None)
        if ref is not None and ref.any():
            nz = np.nonzero(np.any(ref > 0.5, axis=tuple(a for a in range(3) if a != axis)))[0]
            lo, hi = nz.min(), nz.max()
        else:
            lo, hi = 0, vol.shape[axis] - 1
        indices = np.unique(np.linspace(lo, hi, n + 2)[1:-1].round().astype(int)) if hi > lo else [lo]
    fig, axes = plt.subplots(1, len(indices), figsize=(size * len(indices), size), squeeze=False)
    for ax, idx in zip(axes[0], indices):
        overlay(ax, _slice(vol, axis, int(idx)), {k: _slice(m, axis, int(idx)) for k, m in ms.items()},
                window=window, contour=contour)
        ax.set_title(f"{'DHW'[axis]}={int(idx)}", fontsize=9)
    if ms:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=MASK_COLOURS[i % len(MASK_COLOURS)], label=k) for i, k in enumerate(ms)]
        fig.legend(handles=handles, loc="lower center", ncol=len(ms), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06 if ms else 0, 1, 1))
    return fig


def show_orthogonal(volume: Any, masks: Mapping[str, Any] | None = None, point: Sequence[int] | None = None,
                    window: tuple[float, float] | None = None, title: str | None = None, size: float = 3.5) -> Any:
    """Axial, coronal and sagittal slices of ``volume`` [D, H, W] through ``point`` (default: centre
    of the first mask, else the volume centre)."""
    import matplotlib.pyplot as plt

    vol = to_numpy(volume)
    ms = {k: to_numpy(v) for k, v in (masks or {}).items()}
    if point is None:
        ref = next(iter(ms.values()), None)
        point = np.array(vol.shape) // 2
        if ref is not None and ref.any():
            from scipy import ndimage

            lab, n = ndimage.label(ref > 0.5)
            biggest = int(np.argmax(ndimage.sum(ref > 0.5, lab, range(1, n + 1)))) + 1
            point = np.array(ndimage.center_of_mass(lab == biggest)).round().astype(int)
    fig, axes = plt.subplots(1, 3, figsize=(3 * size, size))
    for ax, axis, name in zip(axes, (0, 1, 2), ("axial", "coronal", "sagittal")):
        idx = int(point[axis])
        overlay(ax, _slice(vol, axis, idx), {k: _slice(m, axis, idx) for k, m in ms.items()}, window=window)
        ax.set_title(f"{name} ({'DHW'[axis]}={idx})", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def image_grid(images: Sequence[Any], titles: Sequence[str] | None = None, ncols: int = 6,
               window: tuple[float, float] | None = None, masks: Sequence[Any] | None = None,
               size: float = 2.0) -> Any:
    """A grid of 2D images ([H, W] or [1, H, W]) with optional per-image mask contours."""
    import matplotlib.pyplot as plt

    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols)) if n else 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= n:
            ax.axis("off")
            continue
        img = to_numpy(images[k])
        m = {"mask": to_numpy(masks[k])} if masks is not None and masks[k] is not None else None
        overlay(ax, img, m, window=window)
        if titles:
            ax.set_title(titles[k], fontsize=7)
    fig.tight_layout()
    return fig


def mds_embedding(groups: Mapping[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """Metric MDS of feature sets into 2D, all groups together (sklearn ``MDS``, Euclidean distances of the
    features standardised over all rows).

    Args: groups {name: [N_g, D]}. Returns: {name: [N_g, 2]}.
    """
    from sklearn.manifold import MDS

    arrays = {k: np.asarray(v, dtype=np.float64).reshape(len(v), -1) for k, v in groups.items()}
    if len({a.shape[1] for a in arrays.values()}) > 1:
        raise ValueError(f"feature sets of different widths {[a.shape for a in arrays.values()]}: extract them "
                         f"with one network")
    stacked = np.concatenate(list(arrays.values()))
    if len(stacked) < 3:
        raise ValueError(f"MDS needs at least 3 feature rows in all, got {len(stacked)}")
    z = (stacked - stacked.mean(0)) / (stacked.std(0) + 1e-8)
    # classical MDS (Torgerson) as the start of the SMACOF iterations: deterministic, no random restarts
    xy = MDS(n_components=2, init="classical_mds", n_init=1, random_state=seed).fit_transform(z)
    out, start = {}, 0
    for k, a in arrays.items():
        out[k] = xy[start:start + len(a)]
        start += len(a)
    return out


def covariance_ellipse(points: np.ndarray, n_std: float = 2.0) -> tuple[np.ndarray, float, float, float] | None:
    """Centre, width, height and angle (degrees) of the ``n_std`` covariance ellipse of 2D points [N, 2]
    (None with fewer than 3 points)."""
    pts = np.asarray(points, dtype=np.float64)
    if len(pts) < 3:
        return None
    vals, vecs = np.linalg.eigh(np.cov(pts.T))
    vals = np.clip(vals, 0.0, None)
    angle = float(np.degrees(np.arctan2(vecs[1, 1], vecs[0, 1])))
    return pts.mean(0), 2 * n_std * float(np.sqrt(vals[1])), 2 * n_std * float(np.sqrt(vals[0])), angle


def mds_figure(groups: Mapping[str, Any], title: str = "", seed: int = 0) -> Any:
    """Feature sets projected by :func:`mds_embedding`, each with its 2-sigma covariance ellipse (as Lung-DDPM's
    Fig. 4). groups {name: [N_g, D]}."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Ellipse

    xy = mds_embedding(groups, seed)
    fig, ax = plt.subplots(figsize=(5.0, 4.2))
    for k, (name, pts) in enumerate(xy.items()):
        colour = f"C{k}"
        ax.scatter(pts[:, 0], pts[:, 1], s=18, color=colour, label=f"{name} (n {len(pts)})")
        ell = covariance_ellipse(pts)
        if ell is not None:
            centre, w, h, angle = ell
            ax.add_patch(Ellipse(tuple(centre), w, h, angle=angle, fill=False, color=colour, lw=1.2))
    ax.set_xlabel("MDS 1")
    ax.set_ylabel("MDS 2")
    ax.set_title(title or "features, MDS to 2D (ellipses: 2 sigma)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def hu_histogram(volumes: Mapping[str, Any], masks: Mapping[str, Any] | None = None, bins: int = 100,
                 hu_range: tuple[float, float] = (-1100.0, 1000.0), ax: Any = None) -> Any:
    """Histograms of HU values of several volumes (optionally inside their masks)."""
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3))
    else:
        fig = ax.figure
    for name, v in volumes.items():
        vals = to_numpy(v)
        if masks is not None and name in masks:
            vals = vals[to_numpy(masks[name]) > 0.5]
        ax.hist(vals.ravel(), bins=bins, range=hu_range, histtype="step", density=True, label=name)
    ax.set_xlabel("HU")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def bar_counts(counts: Mapping[Any, int] | Any, title: str = "", ax: Any = None, log: bool = False) -> Any:
    """Bar chart of category counts (a dict or a pandas Series)."""
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(4, 3))
    else:
        fig = ax.figure
    items = list(counts.items())
    ax.bar([str(k) for k, _ in items], [v for _, v in items], color="#607d8b")
    if log:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    return fig


def value_counts_grid(table: Any, columns: Sequence[str], ncols: int = 5, log: bool = False,
                      size: float = 2.6, labels: Mapping[str, Mapping[Any, str]] | None = None) -> Any:
    """One bar chart of value counts per column of a DataFrame (e.g. LIDC scores 1..5)."""
    import matplotlib.pyplot as plt

    n = len(columns)
    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for ax, col in zip(axes.flat, columns):
        counts = table[col].value_counts().sort_index()
        names = {k: (labels or {}).get(col, {}).get(k, str(k)) for k in counts.index}
        bar_counts({names[k]: int(v) for k, v in counts.items()}, title=col, ax=ax, log=log)
        ax.tick_params(axis="x", labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- the data source on every figure

_SOURCE: dict[str, str] = {}
_HOOK = "lungsynth.viz:_label_source"


def label_figures(source: str | None) -> None:
    """Print ``data: <source>`` ("phantom", "LIDC-IDRI", ...) in the top-left corner of every figure pyplot
    makes from now on (matplotlib's ``figure.hooks``), so no figure's numbers can be read as another
    source's. ``None`` stops labelling."""
    import matplotlib

    hooks = [h for h in matplotlib.rcParams["figure.hooks"] if h != _HOOK]
    if source:
        _SOURCE["label"] = str(source)
        hooks.append(_HOOK)
    else:
        _SOURCE.pop("label", None)
    matplotlib.rcParams["figure.hooks"] = hooks


def _label_source(fig: Any) -> None:
    if "label" in _SOURCE:
        fig.text(0.005, 0.995, f"data: {_SOURCE['label']}", ha="left", va="top", fontsize=7, color="0.35")
