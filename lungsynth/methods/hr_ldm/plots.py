"""Figures of chapter 05: the soft histogram, the inpainting steps, the subtype x size grid (the
paper's Figure 4), target vs generated histograms. Images are drawn with :mod:`lungsynth.viz`."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from lungsynth.methods.hr_ldm.model import SUBTYPES, bin_centres, soft_histogram
from lungsynth.methods.hr_ldm.sample import SIZE_BINS_MM, HrLdm, InpaintResult, NoduleLibrary, inpaint_volume

WINDOW = (-1000.0, 400.0)


def plot_soft_histogram(values: np.ndarray, bins: int = 10, value_range: tuple[float, float] = (0.0, 1.0)) -> Any:
    """Hard vs triangular-kernel soft histogram of ``values`` [N], with the kernel of three bins drawn."""
    import matplotlib.pyplot as plt

    v = torch.as_tensor(np.asarray(values, dtype=np.float64))
    centres = bin_centres(bins, value_range)
    width = centres[1] - centres[0]
    hard, _ = np.histogram(np.clip(values, *value_range), bins=bins, range=value_range)
    soft = soft_histogram(v, bins=bins, value_range=value_range).numpy()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3))
    xs = np.linspace(*value_range, 400)
    for k in (2, 3, 4):
        a.plot(xs, np.clip(1 - np.abs(xs - centres[k]) / width, 0, None), label=f"w_{k}(x)")
    a.set_title("triangular kernel: w_k(x) = max(0, 1 - |x - c_k| / Delta)", fontsize=9)
    a.set_xlabel("x")
    a.legend(fontsize=7)
    b.bar(centres, hard / hard.sum(), width=width * 0.9, alpha=0.5, label="hard histogram")
    b.plot(centres, soft, "o-", color="C3", label="soft histogram (differentiable)")
    b.set_title(f"{len(values)} values, {bins} bins", fontsize=9)
    b.legend(fontsize=7)
    fig.tight_layout()
    return fig


@torch.no_grad()
def plot_inpaint_steps(model: HrLdm, result: InpaintResult, n: int = 6) -> Any:
    """Decoded predicted x0 (centre axial slice of the crop) along the reverse process of ``result``
    (run :func:`inpaint_volume` with ``intermediates_every``), then the final crop."""
    from lungsynth.methods.hr_ldm.model import unit_to_hu
    from lungsynth.viz import image_grid

    inter = result.intermediates or []
    if not inter:
        raise ValueError("the result has no intermediates; call inpaint_volume(..., intermediates_every=k)")
    pick = [inter[int(i)] for i in np.linspace(0, len(inter) - 1, min(n, len(inter)))]
    c = result.crop_mask.shape[0] // 2
    images, titles = [result.crop_before[c]], ["input crop"]
    for it in pick:
        x = model.vae.decode_latent(it["pred_x0"].to(model.device)).clamp(0, 1).cpu()
        images.append(unit_to_hu(x[0, 0, c].numpy(), model.cfg))
        titles.append(f"x0-hat, t={it['timestep'] + 1}")
    images.append(result.crop_after[c])
    titles.append(f"result ({SUBTYPES[result.subtype]})")
    return image_grid(images, titles, ncols=len(images), window=WINDOW,
                      masks=[result.crop_mask[c]] * len(images), size=1.8)


def subtype_size_grid(model: HrLdm, ct_hu: np.ndarray, lung: np.ndarray, library: NoduleLibrary, *,
                      spacing_mm: float, seed: int = 0, steps: int | None = None,
                      size_bins: Sequence[tuple[float, float]] = SIZE_BINS_MM) -> list[list[InpaintResult | None]]:
    """One nodule per (subtype, size bin) inpainted into the same scan at the same centre: rows are
    subtypes, columns size bins (the paper's Figure 4). A cell whose subtype and size the library lacks is
    None (the library never substitutes another subtype or size)."""
    from lungsynth.methods.hr_ldm.sample import sample_centre

    rng = np.random.default_rng(seed)
    biggest = max(b[1] for b in size_bins)
    centre = sample_centre(lung, biggest / 2, spacing_mm, rng, model.cfg.hr_ldm.lung_erosion_mm)
    grid = []
    for y in range(3):
        row = []
        for j, size in enumerate(size_bins):
            row.append(inpaint_volume(model, ct_hu, lung, y, spacing_mm=spacing_mm, library=library, centre=centre,
                                      size_range_mm=size, seed=seed + 10 * y + j, steps=steps)
                       if library.has(y, size) else None)
        grid.append(row)
    return grid


def plot_subtype_size_grid(grid: list[list[InpaintResult | None]],
                           size_bins: Sequence[tuple[float, float]] = SIZE_BINS_MM) -> Any:
    """Centre axial slice of each generated crop with the nodule contour; rows subtypes, columns sizes."""
    import matplotlib.pyplot as plt

    from lungsynth.viz import overlay

    fig, axes = plt.subplots(len(grid), len(grid[0]), figsize=(2.4 * len(grid[0]), 2.4 * len(grid)), squeeze=False)
    for i, row in enumerate(grid):
        for j, res in enumerate(row):
            if res is None:
                axes[i, j].text(0.5, 0.5, "no real nodule\nof this kind", ha="center", va="center", fontsize=8)
                axes[i, j].set_xticks([]), axes[i, j].set_yticks([])
            else:
                c = int(np.argmax(res.crop_mask.sum(axis=(1, 2))))
                overlay(axes[i, j], res.crop_after[c], {"nodule": res.crop_mask[c]}, window=WINDOW)
            if i == 0:
                axes[i, j].set_title(f"{size_bins[j][0]:g}-{size_bins[j][1]:g} mm", fontsize=9)
            if j == 0:
                axes[i, j].set_ylabel(SUBTYPES[i], fontsize=9)
    fig.tight_layout()
    return fig


def plot_histograms(results: Sequence[InpaintResult], bins: int = 40,
                    hu_range: tuple[float, float] = (-1000.0, 400.0)) -> Any:
    """Target vs generated HU histogram of each result (one panel per result)."""
    import matplotlib.pyplot as plt

    from lungsynth.methods.hr_ldm.model import js_divergence_np

    centres = bin_centres(bins, hu_range)
    width = centres[1] - centres[0]
    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 2.6), squeeze=False)
    for ax, res in zip(axes[0], results):
        ax.bar(centres, res.target_histogram, width=width, alpha=0.5, label="target")
        ax.step(centres, res.generated_histogram, where="mid", color="C3", label="generated")
        jsd = js_divergence_np(res.target_histogram, res.generated_histogram)
        ax.set_title(f"{SUBTYPES[res.subtype]}, JSD {jsd:.3f}", fontsize=9)
        ax.set_xlabel("HU")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
