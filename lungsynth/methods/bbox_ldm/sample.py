"""Sample the bbox-LDM (chapter 04): load a trained configuration, reverse diffusion, where the conditions come from.

Sampling (Mari et al. §2.2): ``z_T ~ N(0, I)``, then ``T`` ancestral DDPM steps (Ho et al. 2020,
Algorithm 2) or fewer deterministic DDIM steps, each ``eps_theta([z_t, m], t, c)`` with the box mask ``m``
concatenated and (configs 2, 3) the context ``c`` in cross-attention; the slice is the VQ-VAE decoding
``x = D(z_0)`` in [0, 1] over ``cfg.bbox_ldm.hu_clip`` (:func:`to_hu` maps it back to HU).

Where the boxes come from at inference (:func:`draw_conditions`):

- :class:`PaperMaskSampler` (Mari et al. §3.2): the box centre is drawn from a per-pixel probability map
  of nodule-centre presence built from the training masks, the side from the empirical box-size
  distribution, the five attributes independently and uniformly in 1..5. Nothing ties the box to
  the anatomy, so some boxes fall in muscle, bone or outside the body.
- :class:`AnatomicalMaskSampler` (this course's alternative): a real nodule (its size and its
  attributes together) from the nodule table, placed uniformly among the positions where the whole
  box lies inside the lung mask of a real training slice.

Where those boxes fall (the tissue under each box) is measured in :mod:`lungsynth.methods.bbox_ldm.evaluate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from scipy import ndimage

from lungsynth.engine import load_weights
from lungsynth.methods.bbox_ldm.model import (ATTRIBUTES, SCORE_MAX, SCORE_MIN, autoencoder, autoencoder_name,
                                              box_masks, decode, lung_to_latent, mask_to_latent, validate_attributes,
                                              validate_boxes)
from lungsynth.methods.bbox_ldm.train import KIND, BboxLdmTask, default_run_dir, load_split

SAMPLERS: tuple[str, ...] = ("paper", "anatomical")


def to_hu(images: torch.Tensor | np.ndarray, hu_clip: Sequence[float]) -> np.ndarray:
    """[0, 1] images over ``hu_clip`` -> HU (float32 NumPy)."""
    x = images.detach().cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
    lo, hi = float(hu_clip[0]), float(hu_clip[1])
    return (lo + x.astype(np.float32) * (hi - lo)).astype(np.float32)


# --------------------------------------------------------------------------- load and sample


class BboxLdm:
    """A trained configuration ready to sample: U-Net, condition encoder, scheduler, frozen VQ-VAE."""

    def __init__(self, task: BboxLdmTask, ae, cfg, run_dir: Path) -> None:
        self.task, self.ae, self.cfg, self.run_dir = task, ae, cfg, run_dir
        self.config_id = task.config_id
        self.lung = task.lung
        self.image_size = int(cfg.data.size_2d)

    @property
    def device(self) -> torch.device:
        return next(self.task.unet.parameters()).device

    @torch.no_grad()
    def sample(self, boxes: Any, attributes: Any, *, lungs: Any = None, seed: int = 0, steps: int | None = None,
               batch_size: int = 16, progress: bool = False, same_noise: bool = False) -> torch.Tensor:
        """Slices [B, 1, H, W] in [0, 1] (over ``cfg.bbox_ldm.hu_clip``) for boxes [B, 3] and attributes [B, 5]
        (and, for the lung-conditioned variant, the lung masks [B, H, W] the boxes were placed in).

        Boxes outside the image or attributes outside 1..5 are a ValueError. With ``steps`` equal to
        the T training steps the sampler is ancestral DDPM, otherwise deterministic DDIM. Sample i draws its
        noise from its own stream (seed, i), so it does not depend on the batch it is drawn in;
        ``same_noise`` gives every sample stream 0 (a sweep of one condition at a time).
        """
        from lungsynth.diffusion.samplers import per_sample_generators
        from lungsynth.diffusion.samplers import sample as reverse
        from lungsynth.diffusion.schedules import make_scheduler

        b = validate_boxes(boxes, self.image_size)
        a = validate_attributes(attributes)
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"{b.shape[0]} boxes but {a.shape[0]} attribute rows; give one row of 5 scores per box")
        if (lungs is not None) != self.lung:
            raise ValueError("this model is conditioned on the lung: pass lungs [B, H, W] (an anatomical draw's "
                             "slices)" if self.lung else "this model has no lung channel; sample it without lungs")
        lung_t = None if lungs is None else torch.as_tensor(np.asarray(lungs)).float().reshape(b.shape[0], 1,
                                                                                              self.image_size, -1)
        c = self.cfg.bbox_ldm
        n_steps = int(steps or c.ddim_steps)
        kind = "ddpm" if n_steps >= c.num_train_timesteps else "ddim"
        sched = make_scheduler(kind, c.num_train_timesteps, "linear", self.task.prediction)
        dev = self.device
        unet = self.task.unet.eval()
        h = self.image_size // self.task.factor
        out = []
        for i in range(0, b.shape[0], batch_size):
            m = mask_to_latent(box_masks(b[i:i + batch_size], self.image_size), self.task.factor).to(dev)
            lung = None if lung_t is None else lung_to_latent(lung_t[i:i + batch_size], self.task.factor).to(dev)
            cond: dict[str, Any] = {"concat": self.task.concat(m, lung)}
            ctx = self.task.context(m, a[i:i + batch_size].to(dev))
            if ctx is not None:
                cond["context"] = ctx
            if same_noise:  # stream 0 for every sample: the same start (and step) noise
                first = per_sample_generators(seed, 0, 1)[0].initial_seed()
                gens = [torch.Generator().manual_seed(first) for _ in range(m.shape[0])]
            else:
                gens = per_sample_generators(seed, i, m.shape[0])
            z = reverse(lambda x, t, **kw: unet(x, t, **kw), sched, (m.shape[0], self.task.latent_channels, h, h),
                        n_steps, generator=gens, device=dev, condition=cond, progress=progress,
                        desc=f"bbox-LDM config {self.config_id}{' + lung' if self.lung else ''}")
            out.append(decode(self.ae, z))
        return torch.cat(out)


def load(cfg, config: int, run_dir: Path | str | None = None, device: torch.device | str | None = None,
         ae: Any = None, lung: bool = False) -> BboxLdm:
    """A trained configuration (``lung``: its lung-conditioned variant); refuses a checkpoint of another
    architecture; ``ae`` as in :func:`train`."""
    from lungsynth.runtime import device as default_device

    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg, config, create=False, lung=lung)
    dev = torch.device(device) if device is not None else default_device()
    ae = (ae if ae is not None else autoencoder(cfg)).to(dev).eval().requires_grad_(False)
    task = BboxLdmTask(cfg, config, ae.latent_channels, ae.downsample, lung, autoencoder_name(ae))
    load_weights(run_dir, kind=KIND, config=task.config(), modules=task.modules())
    for mod in task.modules().values():
        mod.to(dev).eval().requires_grad_(False)
    return BboxLdm(task, ae, cfg, run_dir)


# --------------------------------------------------------------------------- mask samplers


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


# --------------------------------------------------------------------------- the samplers of a profile


def paper_sampler(cfg, smooth_px: float = 0.0) -> PaperMaskSampler:
    """Mari et al.'s sampler fitted on the training boxes."""
    data = load_split(cfg, "train")
    return PaperMaskSampler(data["boxes"], int(cfg.data.size_2d), smooth_px)


def anatomical_sampler(cfg) -> AnatomicalMaskSampler:
    """Real nodules (size with attributes) from the nodule table, placed inside real training lungs."""
    import pandas as pd

    from lungsynth.data.datasets import ensure_prepared

    prepared = ensure_prepared(cfg)
    table = pd.read_csv(nodule_table_path(prepared))
    train = load_split(cfg, "train")
    # the sides at the training slices' median pixel (fields of view differ a little from scan to scan)
    sides, attrs = table_sides_and_attributes(table, float(np.median(train["spacings"])), int(cfg.data.size_2d))
    return AnatomicalMaskSampler(train["lungs"], sides, attrs)


def draw_conditions(cfg, sampler: str, n: int, seed: int = 0) -> MaskDraw:
    """``n`` (box, attributes) conditions from the ``paper`` or ``anatomical`` sampler."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown mask sampler {sampler!r}; use 'paper' or 'anatomical'")
    s = paper_sampler(cfg) if sampler == "paper" else anatomical_sampler(cfg)
    return s.sample(int(n), seed)
