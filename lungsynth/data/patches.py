"""Random training cubes cut from whole volumes, centred on a drawn nodule or a drawn voxel of a mask.

The course trains some 3D networks on cubes smaller than its volumes (the CPU budget); they are fully
convolutional and run on the whole volume afterwards. Randomness comes from torch's global RNG, which the
engine checkpoints, so a killed run resumes with the same cubes (``num_workers=0``).

Nodule crops (:func:`cut_crop`, :func:`coarsen`) are cut the same way for every reader of them (the downstream
chapters' items, the leaderboard's nodule-crop rows), so real and synthetic crops differ only by what is in them.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset


def nodule_centre(labels: torch.Tensor) -> list[int] | None:
    """A random voxel of a random nodule of ``labels`` (a label map, one value per nodule; None if empty).

    The nodule is drawn first, uniformly, then a voxel inside it: drawing a voxel of the whole foreground
    would centre almost every cube on the largest nodule of a scan, and a 3-voxel nodule beside a
    1000-voxel one would almost never be seen.
    """
    values = torch.unique(labels[labels > 0])
    if not len(values):
        return None
    value = values[int(torch.randint(len(values), ()))]
    return mask_voxel(labels == value)


def mask_voxel(mask: torch.Tensor) -> list[int] | None:
    """A uniformly drawn voxel where ``mask`` is true (None if it is empty)."""
    idx = torch.nonzero(mask)
    if not len(idx):
        return None
    return idx[int(torch.randint(len(idx), ()))].tolist()


def cube_slices(spatial: Sequence[int], side: int, centre: Sequence[int] | None = None) -> tuple[slice, ...]:
    """Slices of a cube of ``side`` inside ``spatial``: around ``centre`` (shifted to fit), else at random."""
    if centre is None:
        starts = [int(torch.randint(0, s - side + 1, ())) for s in spatial]
    else:
        starts = [min(max(int(c) - side // 2, 0), s - side) for c, s in zip(centre, spatial)]
    return tuple(slice(a, a + side) for a in starts)


class LungCubes(Dataset):
    """Cubes of side ``side`` cut at one place from every key of a volume item (``[C, *S]`` tensors).

    A share ``nodule_share`` of the cubes is centred on a drawn nodule of ``item["label"]``
    (:func:`nodule_centre`), the rest on a drawn voxel of ``item["lung"]``: the lungs are where a
    layout-conditioned model generates, and a cube of the empty air around the body teaches it nothing.
    Items without a nodule or a lung fall back to the lung, then to a random place.

    Args:
        base: a dataset of dicts holding ``keys`` (and ``"lung"`` / ``"label"`` to centre on).
        keys: the items' entries to cut (e.g. ``("ct", "lung", "label")``); other entries are dropped.
        side: the cube's side (an item no larger than it is returned whole).
    """

    def __init__(self, base: Dataset, keys: Sequence[str], side: int, nodule_share: float = 0.5) -> None:
        if not 0.0 <= nodule_share <= 1.0:
            raise ValueError(f"nodule_share must lie in [0, 1], got {nodule_share}")
        self.base, self.keys, self.side, self.nodule_share = base, tuple(keys), int(side), float(nodule_share)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.base[i]
        out = {k: torch.as_tensor(item[k]) for k in self.keys}
        spatial = out[self.keys[0]].shape[1:]
        if all(s <= self.side for s in spatial):
            return out
        centre = None
        if "label" in item and float(torch.rand(())) < self.nodule_share:
            centre = nodule_centre(torch.as_tensor(item["label"])[0])
        if centre is None and "lung" in item:
            centre = mask_voxel(torch.as_tensor(item["lung"])[0] > 0.5)
        sl = (slice(None), *cube_slices(spatial, self.side, centre))
        return {k: v[sl].contiguous() for k, v in out.items()}


# --------------------------------------------------------------------------- nodule crops at 1 mm


# Bump when a crop's pixels or mask change: finished downstream trainings made from older crops train again.
# 2: masks trilinear >= 0.5 instead of nearest
CROP_VERSION = 2


def cut_crop(ct_hu: np.ndarray, label: np.ndarray, centre_vox: Sequence[float], spacing_mm: float,
             size: int) -> tuple[np.ndarray, np.ndarray]:
    """A ``size``^3 crop at 1 mm centred on ``centre_vox`` (d, h, w) of a volume at ``spacing_mm``.

    Args:
        ct_hu / label: [D, H, W] arrays (``label``: a label map, > 0 on nodules). Outside the volume the CT is
            -1000 HU and the label 0.
    Returns:
        ct [size]^3 (HU, trilinear) and mask [size]^3: the nodule indicator interpolated trilinearly, >= 0.5.
        Nearest neighbours gave the mask the coarse voxels' cubes (a 6 mm nodule at 2.7 mm: a 5.3 mm block), a shape
        no network predicts from the trilinear CT: balls of 5-10 mm coarsened to 2.7 mm and cut back at 1 mm kept
        1.0-2.3x their volume at Dice 0.58-0.81 with them, 0.8-1.7x at Dice 0.71-0.87 this way (12 placements each).
    """
    from scipy import ndimage

    t = (np.arange(size) - (size - 1) / 2) / float(spacing_mm)
    grid = np.stack(np.meshgrid(*(c + t for c in centre_vox), indexing="ij")).reshape(3, -1)
    ct = ndimage.map_coordinates(ct_hu, grid, order=1, cval=-1000.0).reshape((size,) * 3)
    mask = ndimage.map_coordinates((label > 0).astype(np.float32), grid, order=1, cval=0.0).reshape((size,) * 3)
    return ct.astype(np.float32), (mask >= 0.5).astype(np.float32)


def coarsen(ct_hu: np.ndarray, label: np.ndarray, spacing_mm: float, to_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """A volume at ``spacing_mm`` resampled to the coarser ``to_mm`` (CT: Gaussian anti-aliasing, then linear;
    label: nearest, which :func:`cut_crop` then smooths; a coarse voxel's averaged share of nodule, cut the same
    way, shrank 5-6 mm balls to 0.2-0.3x their volume, measured). Voxel ``i`` of the result sits at voxel
    ``i * to_mm / spacing_mm`` of the input."""
    from scipy import ndimage

    factor = float(spacing_mm) / float(to_mm)
    shape = [max(1, int(round(n * factor))) for n in ct_hu.shape]
    grid = np.stack(np.meshgrid(*(np.arange(n) / factor for n in shape), indexing="ij"))
    smooth = ndimage.gaussian_filter(ct_hu.astype(np.float32), sigma=0.5 / factor)  # half a coarse voxel
    ct = ndimage.map_coordinates(smooth, grid, order=1, mode="nearest")
    lab = ndimage.map_coordinates(label, grid, order=0, mode="nearest")
    return ct.astype(np.float32), lab
