"""Lung-DDPM's figures: reference, layout and samples side by side, and consecutive slices along z."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    import torch


def _centre_index(layout: "torch.Tensor", axis: int = 0) -> int:
    """The slice with the most nodule voxels (else lung voxels, else the middle) along ``axis`` of a [1, *S] layout."""
    for label in (2, 1):
        counts = (layout[0] == label).sum(dim=tuple(d for d in range(3) if d != axis))
        if int(counts.max()) > 0:
            return int(counts.argmax())
    return int(layout.shape[1 + axis] // 2)


def figure_side_by_side(reference: "torch.Tensor", layout: "torch.Tensor", samples: Mapping[str, "torch.Tensor"],
                        index: int | None = None, axis: int = 0) -> Any:
    """Reference, layout and each sample on the same slice (``index``; default through the nodule).

    Args: reference, layout [1, S, S, S]; samples {title: [1, S, S, S]} in [0, 1].
    """
    from lungsynth.viz import image_grid

    idx = _centre_index(layout, axis) if index is None else int(index)

    def cut(v: "torch.Tensor") -> Any:
        return v[0].select(axis, idx)

    images = [cut(reference), cut(layout) / 2.0] + [cut(v) for v in samples.values()]
    titles = ["reference", "layout (0 bg, 1 lung, 2 nodule)"] + list(samples)
    masks = [None, None] + [cut(layout >= 1).float() for _ in samples]
    return image_grid(images, titles, ncols=len(images), window=(0.0, 1.0), masks=masks, size=2.6)


def figure_consecutive_slices(volumes: Mapping[str, "torch.Tensor"], layout: "torch.Tensor", n: int = 5,
                              start: int | None = None, axis: int = 0) -> Any:
    """``n`` consecutive slices of each volume (one row each), to judge consistency along z.

    Args: volumes {title: [1, S, S, S]}; layout [1, S, S, S] (picks the start around the nodule).
    """
    from lungsynth.viz import image_grid

    size = layout.shape[1 + axis]
    first = max(0, min(size - n, (_centre_index(layout, axis) - n // 2) if start is None else int(start)))
    images, titles = [], []
    for name, vol in volumes.items():
        for k in range(first, first + n):
            images.append(vol[0].select(axis, k))
            titles.append(f"{name} z={k}")
    return image_grid(images, titles, ncols=n, window=(0.0, 1.0), size=2.0)
