"""LAND (chapter 03): figures — axial slices through the nodule, the conditions on the latent grid, the
variants side by side. Images are drawn with :mod:`lungsynth.viz`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lungsynth.methods.land.sample import LandModel, nodule_mean_hu, sample


def nodule_slices(volumes: torch.Tensor, conds: torch.Tensor | None) -> tuple[list[np.ndarray], list[Any]]:
    """Axial slices through each condition's nodule centre (volume centre without a nodule).

    Args: volumes [B,1,S,S,S] (HU), conds [B,1,S,S,S] or None. Returns: (slices [S,S], nodule masks [S,S] | None),
    ready for :func:`lungsynth.viz.image_grid`.
    """
    from lungsynth.nn.conditioning import nodule_mask

    imgs, masks = [], []
    for b in range(volumes.shape[0]):
        vol = volumes[b, 0].numpy()
        d = vol.shape[0] // 2
        m = None
        if conds is not None:
            c = conds[min(b, conds.shape[0] - 1), 0]
            nm = nodule_mask(c).numpy()
            if nm.any():
                d = int(np.round(np.argwhere(nm)[:, 0].mean()))
            m = nm[d]
        imgs.append(vol[d])
        masks.append(m)
    return imgs, masks


def plot_condition_grids(cond: torch.Tensor, grids: dict[str, torch.Tensor]) -> Any:
    """The condition and what each variant makes of it on the latent grid: one axial slice each.

    Args: cond [1,1,S,S,S]; grids variant -> [1,K,S/4,S/4,S/4] (:func:`lungsynth.methods.land.condition_grid`).
    Returns the figure (:func:`lungsynth.viz.image_grid`): the image-grid slice through the nodule, then
    channel 0 of every grid at the latent slice of the nodule's centre.
    """
    from lungsynth.viz import image_grid

    imgs, _ = nodule_slices(cond, cond)
    d = (int(round(torch.nonzero(cond[0, 0] > 0.15).float()[:, 0].mean().item())) // 4 if (cond > 0.15).any()
         else cond.shape[2] // 8)
    panels = [imgs[0]] + [g[0, 0, d].numpy() for g in grids.values()]
    return image_grid(panels, ["cond (image grid)"] + [f"{v}: channel 0" for v in grids], ncols=4, size=2.4)


def plot_variants(cfg: Any, models: dict[str, LandModel], *, seed: int = 0) -> tuple[Any, dict[str, float]]:
    """Chapter 03's figure: the held-out condition with the largest nodule, its real volume, and each
    variant's sample on it (``none`` unconditioned), all from the same seed; axial slices through the
    nodule with its outline.

    Returns (figure, {panel: mean HU inside the nodule}).
    """
    from lungsynth.data.preprocess import unit_to_hu
    from lungsynth.methods.land.train import HeldoutVolumes, largest_nodule_indices
    from lungsynth.viz import image_grid

    held = HeldoutVolumes(cfg)
    index = largest_nodule_indices(held, 1)
    cond = held.chunk(index, "cond")
    vols = {"real": unit_to_hu(held.chunk(index, "ct"), cfg.data.hu_min, cfg.data.hu_max)}
    for variant, model in models.items():
        vols[variant] = sample(model, None if variant == "none" else cond, 1, seed=seed)["ct_hu"]
    # the condition drawn on the CT window: lung 0.1 -> -860 HU, nodule texture 5 (1.0) -> 400 HU
    shown = {"condition": cond * (cfg.data.hu_max - cfg.data.hu_min) + cfg.data.hu_min, **vols}
    imgs, masks = nodule_slices(torch.cat(list(shown.values())), cond)
    hu = dict(zip(vols, nodule_mean_hu(torch.cat(list(vols.values())), cond)))
    titles = ["condition"] + [f"{k}: {hu[k]:.0f} HU in nodule" for k in vols]
    fig = image_grid(imgs, titles, masks=masks, window=(cfg.data.hu_min, cfg.data.hu_max), ncols=len(imgs),
                     size=2.3)
    return fig, hu
