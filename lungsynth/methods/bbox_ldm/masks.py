"""Where the boxes come from at inference: the paper's sampler, an anatomical one, and their failures.

- :class:`PaperMaskSampler` (Mari et al.): the box centre is drawn from a per-pixel probability map
  of nodule-centre presence built from the training masks, the side from the empirical box-size
  distribution, the five attributes independently and uniformly in 1..5. Nothing ties the box to
  the anatomy, so some boxes fall in muscle, bone or outside the body.
- :class:`AnatomicalMaskSampler` (this course's alternative): a real nodule (its size and its
  attributes together) from the nodule table, placed uniformly among the positions where the whole
  box lies inside the lung mask of a real training slice.
- :func:`classify_boxes`: the tissue under each box in a real slice, from the lung mask and the HU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from lungsynth.methods.bbox_ldm.model import ATTRIBUTES, SCORE_MAX, SCORE_MIN, validate_boxes

TISSUES: tuple[str, ...] = ("lung", "lung border", "soft tissue", "bone", "outside body")
BONE_HU = 250.0  # median HU under the box at or above this: bone (cortical and trabecular)
BODY_HU = -500.0  # the body is the filled region above this HU


@dataclass
class MaskDraw:
    """Conditions for ``n`` samples: boxes [n, 3] (y0, x0, side), attributes [n, 5], and for the
    anatomical sampler the index of the real slice each box was placed in (else -1)."""

    boxes: np.ndarray
    attributes: np.ndarray
    slice_index: np.ndarray
    sampler: str

    def __len__(self) -> int:
        return len(self.boxes)


def box_centres(boxes: np.ndarray) -> np.ndarray:
    """[n, 3] (y0, x0, side) -> [n, 2] centres (cy, cx) in pixel coordinates (float)."""
    b = np.asarray(boxes, dtype=np.float64)
    return np.stack([b[:, 0] + (b[:, 2] - 1) / 2.0, b[:, 1] + (b[:, 2] - 1) / 2.0], axis=1)


class PaperMaskSampler:
    """Mari et al.'s inference masks, fitted on the training boxes.

    Args:
        boxes: training boxes [n, 3] (y0, x0, side) on a ``size`` x ``size`` grid.
        size: the image side.
        smooth_px: Gaussian sigma (pixels) applied to the centre-count map (0 keeps the raw counts).

    Attributes:
        centre_map: [size, size] probability of a nodule centre at each pixel (sums to 1).
        sides: the empirical box sides.
    """

    def __init__(self, boxes: np.ndarray, size: int, smooth_px: float = 0.0) -> None:
        b = validate_boxes(np.asarray(boxes), size).numpy()
        self.size = int(size)
        centres = np.clip(np.rint(box_centres(b)).astype(int), 0, self.size - 1)
        counts = np.zeros((self.size, self.size), dtype=np.float64)
        np.add.at(counts, (centres[:, 0], centres[:, 1]), 1.0)
        if smooth_px > 0:
            counts = ndimage.gaussian_filter(counts, smooth_px, mode="constant")
        self.centre_map = counts / counts.sum()
        self.sides = b[:, 2].copy()

    def sample(self, n: int, rng: np.random.Generator | int | None = None) -> MaskDraw:
        """``n`` boxes and uniform attributes; a box that would cross the border is shifted inside."""
        rng = np.random.default_rng(rng)
        flat = rng.choice(self.centre_map.size, size=n, p=self.centre_map.ravel())
        cy, cx = np.divmod(flat, self.size)
        sides = rng.choice(self.sides, size=n, replace=True)
        y0 = np.clip(np.rint(cy - (sides - 1) / 2.0).astype(int), 0, self.size - sides)
        x0 = np.clip(np.rint(cx - (sides - 1) / 2.0).astype(int), 0, self.size - sides)
        attrs = rng.integers(SCORE_MIN, SCORE_MAX + 1, size=(n, len(ATTRIBUTES)))
        return MaskDraw(np.stack([y0, x0, sides], axis=1).astype(np.int64), attrs.astype(np.int64),
                        np.full(n, -1, dtype=np.int64), "paper")


def _fits(lung: np.ndarray, side: int) -> np.ndarray:
    """Top-left corners (y0, x0) where a side x side box lies entirely inside ``lung`` [H, W]: [k, 2]."""
    h, w = lung.shape
    if side > min(h, w):
        return np.zeros((0, 2), dtype=np.int64)
    ii = np.pad(np.cumsum(np.cumsum(lung.astype(np.int64), 0), 1), ((1, 0), (1, 0)))
    s = side
    box_sum = ii[s:, s:] - ii[:-s, s:] - ii[s:, :-s] + ii[:-s, :-s]  # [H-s+1, W-s+1]
    return np.argwhere(box_sum == s * s)


class AnatomicalMaskSampler:
    """Real nodules placed inside real lungs.

    Args:
        lungs: lung masks of real slices [m, H, W] (bool or {0,1}).
        sides: box side in pixels of every row of the nodule table [k].
        attributes: the matching scores [k, 5] (1..5), drawn together with the side.
    """

    def __init__(self, lungs: np.ndarray, sides: Sequence[int], attributes: np.ndarray) -> None:
        self.lungs = np.asarray(lungs) > 0
        if self.lungs.ndim != 3 or not self.lungs.any():
            raise ValueError("AnatomicalMaskSampler needs lung masks [m, H, W] with some lung in them")
        self.sides = np.asarray(sides, dtype=np.int64)
        self.attributes = np.asarray(attributes, dtype=np.int64)
        if len(self.sides) != len(self.attributes) or len(self.sides) == 0:
            raise ValueError(f"{len(self.sides)} sides for {len(self.attributes)} attribute rows; the nodule table "
                             f"must give one side and one set of scores per nodule")
        self._fit_cache: dict[tuple[int, int], np.ndarray] = {}

    def _corners(self, slice_idx: int, side: int) -> np.ndarray:
        key = (slice_idx, side)
        if key not in self._fit_cache:
            self._fit_cache[key] = _fits(self.lungs[slice_idx], side)
        return self._fit_cache[key]

    def sample(self, n: int, rng: np.random.Generator | int | None = None, max_tries: int = 200) -> MaskDraw:
        """``n`` boxes, each entirely inside the lung of the slice recorded in ``slice_index``."""
        rng = np.random.default_rng(rng)
        boxes, attrs, idx = [], [], []
        for _ in range(n):
            for _ in range(max_tries):
                row = int(rng.integers(len(self.sides)))
                s = int(self.sides[row])
                k = int(rng.integers(len(self.lungs)))
                corners = self._corners(k, s)
                if len(corners):
                    y0, x0 = corners[int(rng.integers(len(corners)))]
                    boxes.append((int(y0), int(x0), s))
                    attrs.append(self.attributes[row])
                    idx.append(k)
                    break
            else:
                raise ValueError(f"no nodule of the table fits inside any of the {len(self.lungs)} lung masks after "
                                 f"{max_tries} tries; the boxes are larger than the lungs at this image size")
        return MaskDraw(np.asarray(boxes, dtype=np.int64), np.asarray(attrs, dtype=np.int64),
                        np.asarray(idx, dtype=np.int64), "anatomical")


# --------------------------------------------------------------------------- the nodule table


def nodule_table_path(prepared: Path) -> Path:
    """``data/lidc_nodules.csv`` when the repository ships it, else the prepared ``nodules.csv``."""
    from lungsynth import paths

    shipped = paths.shipped_data_dir() / "lidc_nodules.csv"
    if shipped.is_file():
        return shipped
    table = Path(prepared) / "nodules.csv"
    if not table.is_file():
        raise FileNotFoundError(f"no nodule table: neither {shipped} nor {table} exists; prepare the data "
                                f"first (lungsynth.data.datasets.ensure_prepared(cfg))")
    return table


def table_sides_and_attributes(table, spacing_mm: float, size: int, box_scale: float = 1.0
                               ) -> tuple[np.ndarray, np.ndarray]:
    """Box sides (pixels) and scores [k, 5] from a nodule table (pandas DataFrame).

    The side is ``ceil(box_scale * diameter_mm / spacing_mm)`` clipped to 1..size; the scores are the
    reader medians rounded half up (rows without a diameter or with a missing score are dropped).
    """
    cols = ["diameter_mm", *ATTRIBUTES]
    missing = [c for c in cols if c not in table.columns]
    if missing:
        raise ValueError(f"the nodule table lacks column(s) {missing}; it needs {cols}")
    df = table[cols].dropna()
    sides = np.clip(np.ceil(box_scale * df["diameter_mm"].to_numpy(float) / spacing_mm), 1, size).astype(np.int64)
    attrs = np.clip(np.floor(df[list(ATTRIBUTES)].to_numpy(float) + 0.5), SCORE_MIN, SCORE_MAX).astype(np.int64)
    return sides, attrs


# --------------------------------------------------------------------------- where the boxes fall


def body_mask(hu: np.ndarray) -> np.ndarray:
    """The body in one slice [H, W]: the largest connected region above -500 HU, holes (lungs) filled."""
    body = ndimage.binary_fill_holes(hu > BODY_HU)
    labels, n = ndimage.label(body)
    if n == 0:
        return body
    sizes = ndimage.sum(body, labels, range(1, n + 1))
    return labels == (1 + int(np.argmax(sizes)))


def classify_box(box: Sequence[int], hu: np.ndarray, lung: np.ndarray, body: np.ndarray | None = None) -> str:
    """The tissue under one box (y0, x0, side) in a real slice: one of :data:`TISSUES`.

    ``lung``: the whole box inside the lung mask; ``lung border``: part of it; otherwise by the
    median HU under the box: ``outside body`` when its centre is outside the body, ``bone`` at or
    above :data:`BONE_HU`, else ``soft tissue`` (muscle, fat, mediastinum).
    """
    y0, x0, s = (int(v) for v in box)
    inside = lung[y0:y0 + s, x0:x0 + s] > 0
    if inside.all():
        return "lung"
    if inside.any():
        return "lung border"
    body = body_mask(hu) if body is None else body
    cy, cx = y0 + s // 2, x0 + s // 2
    if not body[cy, cx]:
        return "outside body"
    return "bone" if float(np.median(hu[y0:y0 + s, x0:x0 + s])) >= BONE_HU else "soft tissue"


def classify_boxes(boxes: np.ndarray, hu_slices: np.ndarray, lungs: np.ndarray) -> list[str]:
    """:func:`classify_box` for box i in real slice i; ``hu_slices``/``lungs`` [n, H, W]."""
    return [classify_box(b, hu_slices[i], lungs[i]) for i, b in enumerate(np.asarray(boxes))]


def inside_lung_rate(labels: Sequence[str]) -> float:
    """Fraction of boxes entirely inside the lung."""
    return float(np.mean([lab == "lung" for lab in labels])) if len(labels) else float("nan")


def tissue_counts(labels: Sequence[str]) -> dict[str, int]:
    return {t: int(sum(lab == t for lab in labels)) for t in TISSUES}
