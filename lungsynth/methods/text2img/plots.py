"""Figures of chapter 07: the guidance sweep (its curves and its ROIs) and generated ROIs beside the real ROI
whose prompt they were generated from."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def guidance_grid(rows: Sequence[dict[str, Any]]) -> Any:
    """The first generated ROIs of each swept scale (rows of :func:`~.evaluate.guidance_sweep`): one row per
    guidance scale, one column per held-out prompt, the same starting noise in every row. Returns the figure."""
    from lungsynth.viz import image_grid

    swept = [r for r in rows if r["guidance"] != "real"]
    images = [img for r in swept for img in r["images"]]
    titles = [f"s = {r['guidance']:g}" if j == 0 else "" for r in swept for j in range(len(r["images"]))]
    return image_grid(images, titles=titles, ncols=len(swept[0]["images"]), window=(0, 1))


def sweep_curves(rows: Sequence[dict[str, Any]]) -> Any:
    """The sweep as curves against the guidance scale: KID and FID (left), mean balanced accuracy of attribute
    recovery with the real ROIs' level and chance (middle), MS-SSIM diversity with the real ROIs' (right)."""
    import matplotlib.pyplot as plt

    real = next(r for r in rows if r["guidance"] == "real")
    swept = [r for r in rows if r["guidance"] != "real"]
    s = [float(r["guidance"]) for r in swept]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(12, 3.2))
    a.plot(s, [r["kid"] for r in swept], "o-", label="KID")
    a.set_ylabel("KID")
    twin = a.twinx()
    twin.plot(s, [r["fid"] for r in swept], "s--", color="tab:orange", label="FID")
    twin.set_ylabel("FID")
    a.set_title("distribution (lower is better)")
    chance = np.mean([v for k, v in real.items() if k.startswith("chance_")])
    b.plot(s, [r["bacc_mean"] for r in swept], "o-", label="generated")
    b.axhline(real["bacc_mean"], color="k", ls="--", label="real ROIs")
    b.axhline(chance, color="grey", ls=":", label="chance (mean)")
    b.set_title("prompt adherence: mean balanced accuracy")
    b.legend(fontsize=7)
    c.plot(s, [r["ms_ssim"] for r in swept], "o-", label="generated")
    c.axhline(real["ms_ssim"], color="k", ls="--", label="real ROIs")
    c.set_title("MS-SSIM between samples (lower: more diverse)")
    c.legend(fontsize=7)
    for ax in (a, b, c):
        ax.set_xlabel("guidance scale")
        ax.set_xticks(s)
    fig.tight_layout()
    return fig


def prompt_grid(real: Sequence[Any], generated: Sequence[Sequence[Any]], prompts: Sequence[str]) -> Any:
    """One row per prompt: the real ROI it was written from, then the ROIs generated for it ([R, R] in [0, 1]);
    the row is labelled with the prompt's levels (calcification 1 absent, 2 present)."""
    import matplotlib.pyplot as plt

    from lungsynth.data.prompts import PROMPT_ATTRIBUTES, parse_prompt
    from lungsynth.viz import overlay, to_numpy

    n, k = len(real), max(len(g) for g in generated)
    fig, axes = plt.subplots(n, k + 1, figsize=(1.8 * (k + 1), 1.9 * n + 0.3), squeeze=False)
    for i in range(n):
        overlay(axes[i, 0], to_numpy(real[i]).squeeze(), None, window=(0, 1))
        axes[i, 0].set_title("real" if i == 0 else "", fontsize=8)
        for j in range(k):
            ax = axes[i, j + 1]
            if j < len(generated[i]):
                overlay(ax, to_numpy(generated[i][j]).squeeze(), None, window=(0, 1))
            else:
                ax.axis("off")
            if i == 0:
                ax.set_title(f"generated {j + 1}", fontsize=8)
        levels = parse_prompt(prompts[i])
        axes[i, 0].set_ylabel("\n".join(f"{a[:4]} {levels[a]}" for a in PROMPT_ATTRIBUTES), fontsize=6, rotation=0,
                              ha="right", va="center")
    fig.tight_layout()
    return fig
