"""Figures of chapter 04: slices with their red condition box, configurations side by side, samplers, PNG grids."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np


def _draw_box(ax, box: Sequence[int], color: str = "red") -> None:
    from matplotlib.patches import Rectangle

    y0, x0, s = (int(v) for v in box)
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), s, s, fill=False, edgecolor=color, linewidth=1.2))


def _img(x: Any) -> np.ndarray:
    a = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    return a.reshape(a.shape[-2:])


def show_slices(images: Any, boxes: Any, titles: Sequence[str] | None = None, ncols: int = 8,
                vmax: float | None = None):
    """[N, 1, H, W] slices in a grid, each with its condition box in red. Returns the figure."""
    import matplotlib.pyplot as plt

    n = len(images)
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.8 * ncols, 1.9 * nrows), squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(_img(images[i]), cmap="gray", vmin=0, vmax=vmax or _window_max(images))
        _draw_box(ax, np.asarray(boxes)[i])
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=7)
    fig.tight_layout()
    return fig


def sample_rows(rows: Mapping[str, tuple[Any, Any, Sequence[str]]], n: int = 6):
    """One row per entry ``name -> (slices [N, 1, H, W], boxes [N, 3], titles [N])``, the first ``n`` of each with
    its red box, all on one display window (the first row's). Returns the figure."""
    import matplotlib.pyplot as plt

    names = list(rows)
    vmax = _window_max(rows[names[0]][0])
    fig, axes = plt.subplots(len(names), n, figsize=(1.9 * n, 2.0 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        images, boxes, titles = rows[name]
        for j in range(n):
            ax = axes[r, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(images):
                ax.axis("off")
                continue
            ax.imshow(_img(images[j]), cmap="gray", vmin=0, vmax=vmax)
            _draw_box(ax, np.asarray(boxes)[j])
            ax.set_title(str(titles[j]), fontsize=7)
        axes[r, 0].set_ylabel(name, fontsize=8)
    fig.tight_layout()
    return fig


def _window_max(images: Any) -> float:
    """Display window top: the 99.5th percentile, so soft tissue is visible on the [-1000, 2500] scale."""
    a = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    return float(max(np.percentile(a, 99.5), 1e-3))


def compare_configs(real: Any, samples: Mapping[int, Any], boxes: Any, attributes: Any, n: int = 4,
                    names: Mapping[int, str] | None = None, real_boxes: Any = None):
    """Rows: a real slice (with ``real_boxes``, its own box; else ``boxes``), then each configuration's sample for
    the same box and attributes."""
    import matplotlib.pyplot as plt

    keys = list(samples)
    n = min(n, len(real))
    vmax = _window_max(real)
    fig, axes = plt.subplots(1 + len(keys), n, figsize=(2.0 * n, 2.1 * (1 + len(keys))), squeeze=False)
    for j in range(n):
        rows = [("real", real[j])] + [(f"config {k}", samples[k][j]) for k in keys]
        for i, (label, img) in enumerate(rows):
            ax = axes[i, j]
            ax.imshow(_img(img), cmap="gray", vmin=0, vmax=vmax)
            _draw_box(ax, np.asarray(real_boxes if (i == 0 and real_boxes is not None) else boxes)[j])
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label if names is None or label == "real" else f"{label}\n{names[keys[i - 1]]}",
                              fontsize=7)
        axes[0, j].set_title("attrs " + "".join(str(int(v)) for v in np.asarray(attributes)[j]), fontsize=7)
    fig.tight_layout()
    return fig


def show_samplers(centre_map: np.ndarray, draws: Mapping[str, Any], lungs: np.ndarray, labels: Mapping[str, list],
                  slice_index: Mapping[str, np.ndarray], n: int = 6):
    """Left: the paper's centre probability map; then, per sampler, boxes drawn on the lung masks
    they are judged against (green inside the lung, red elsewhere)."""
    import matplotlib.pyplot as plt

    names = list(draws)
    fig, axes = plt.subplots(len(names), n + 1, figsize=(1.8 * (n + 1), 2.0 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        ax = axes[r, 0]
        if r == 0:
            ax.imshow(centre_map, cmap="magma")
            ax.set_title("centre probability", fontsize=7)
        ax.axis("off")
        for j in range(n):
            ax = axes[r, j + 1]
            k = int(slice_index[name][j])
            ax.imshow(lungs[k], cmap="Blues", vmin=0, vmax=1.5)
            _draw_box(ax, draws[name].boxes[j], "green" if labels[name][j] == "lung" else "red")
            ax.set_title(f"{name}: {labels[name][j]}", fontsize=6)
            ax.axis("off")
    fig.tight_layout()
    return fig


def show_failures(images: Any, boxes: np.ndarray, labels: Sequence[str], per_class: int = 2,
                  classes: Sequence[str] = ("soft tissue", "bone", "outside body", "lung border")):
    """Real slices with a paper-sampler box that is not in the lung, ``per_class`` per tissue class."""
    import matplotlib.pyplot as plt

    picks = [(c, i) for c in classes for i in [k for k, lab in enumerate(labels) if lab == c][:per_class]]
    if not picks:
        fig, ax = plt.subplots(figsize=(3, 1))
        ax.text(0.5, 0.5, "no failure cases in this draw", ha="center", va="center")
        ax.axis("off")
        return fig
    fig, axes = plt.subplots(1, len(picks), figsize=(2.0 * len(picks), 2.2), squeeze=False)
    vmax = _window_max(images)
    for ax, (c, i) in zip(axes[0], picks):
        ax.imshow(_img(images[i]), cmap="gray", vmin=0, vmax=vmax)
        _draw_box(ax, boxes[i])
        ax.set_title(c, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return fig


def save_grid(images: np.ndarray, boxes: np.ndarray, path: Path, titles: list[str] | None = None) -> Path:
    """A PNG of [N, 1, H, W] slices with their condition boxes drawn in red (atomic write)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig = show_slices(images, boxes, titles=titles)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path
