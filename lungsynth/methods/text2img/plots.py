"""Figures of chapter 07: the guidance sweep's generated ROIs, one row per guidance scale."""

from __future__ import annotations

from typing import Any, Sequence


def guidance_grid(rows: Sequence[dict[str, Any]]) -> Any:
    """The first generated ROIs of each swept scale (rows of :func:`~.evaluate.guidance_sweep`): one row per
    guidance scale, one column per held-out prompt, the same starting noise in every row. Returns the figure."""
    from lungsynth.viz import image_grid

    swept = [r for r in rows if r["guidance"] != "real"]
    images = [img for r in swept for img in r["images"]]
    titles = [f"s = {r['guidance']:g}" if j == 0 else "" for r in swept for j in range(len(r["images"]))]
    return image_grid(images, titles=titles, ncols=len(swept[0]["images"]), window=(0, 1))
