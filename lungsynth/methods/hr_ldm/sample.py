"""HR-LDM inference (the paper's Algorithm 2, Sec. 3.3): where, what shape, which subtype and histogram, then
latent inpainting with the background re-anchored at every step, decoded and pasted back.

    1. centre c ~ U{eroded lung}  (optionally U{eroded lung} + U{sub-pleural rim})
    2. shape S ~ library of real nodule masks (of the subtype and size), aligned to c
    3. condition (y, h): the chosen subtype, a target histogram of a real nodule of that subtype
    4. z_bg = E(crop around c);  z_T ~ N(0, I)
       for t = T .. 1:  z_{t-1} = p_theta(z_{t-1} | z_t, y, h, S)
                        z_{t-1} = M z_{t-1} + (1 - M) q(z_bg, t-1)       (re-anchoring, eq. 10)
    5. x = D(z_0), pasted into the volume inside the generated region

:func:`load` gives the trained :class:`HrLdm`; the condition samplers of Algorithm 2 (centres in the
eroded lung, the :class:`NoduleLibrary` of real shapes and target histograms, :func:`place_mask`) are here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lungsynth.methods.hr_ldm.model import (KIND, SUBTYPES, HrLdmNet, conditions, crop_side, hu_histogram, hu_to_unit,
                                            make_schedulers, mask_to_latent, unit_to_hu, validate_histogram,
                                            validate_mask_in_lung, validate_subtype)
from lungsynth.methods.hr_ldm.train import default_run_dir, frozen_vae

SIZE_BINS_MM: tuple[tuple[float, float], ...] = ((6.0, 10.0), (10.0, 20.0), (20.0, 30.0))
CROP_SPACING_MM = 1.0  # CropDataset crops are at 1 mm (lungsynth.data.preprocess.crop_view)


# --------------------------------------------------------------------------- the model bundle


@dataclasses.dataclass
class HrLdm:
    """A trained HR-LDM: denoiser + histogram encoder, the frozen VAE, the sampling scheduler."""

    net: HrLdmNet
    vae: torch.nn.Module
    scheduler: Any
    cfg: Any
    hist_loss: bool = True
    run_dir: Any = None

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def side(self) -> int:
        """Crop side in voxels (``cfg.data.crop_size`` rounded up, see :func:`crop_side`)."""
        return crop_side(self.cfg, self.vae.downsample)

    @property
    def crop_spacing_mm(self) -> float:
        """Voxel size of the model's crops: CropDataset's 1 mm, rescaled when the side was rounded up."""
        return CROP_SPACING_MM * float(self.cfg.data.crop_size) / self.side


def load(cfg: Any, run_dir: Path | str | None = None, hist_loss: bool = True, *, vae: Any = None,
         device: torch.device | str | None = None) -> HrLdm:
    """A trained :class:`HrLdm` (eval mode) from ``run_dir`` (default the variant's run dir)."""
    from lungsynth.engine import check_compatible, load_checkpoint
    from lungsynth.runtime import device as default_device

    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg, hist_loss)
    path = run_dir / "final.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no final.pt in {run_dir}; train it with `lungsynth hr-ldm train --profile "
                                f"{cfg.profile}{'' if hist_loss else ' --no-hist-loss'}` or ensure_trained(cfg)")
    ckpt = load_checkpoint(path)
    check_compatible(ckpt, path, KIND)
    spec = dict(ckpt["config"])
    net = HrLdmNet(spec)
    net.load_state_dict(ckpt["modules"]["net"])
    dev = torch.device(device) if device is not None else default_device()
    vae = frozen_vae(cfg, vae).to(dev)
    _, sample_sched = make_schedulers(cfg, spec.get("prediction", "epsilon"))  # older checkpoints: epsilon
    return HrLdm(net.to(dev).eval().requires_grad_(False), vae, sample_sched, cfg,
                 hist_loss=bool(spec.get("hist_loss", hist_loss)), run_dir=run_dir)


@torch.no_grad()
def inpaint_latent(model: HrLdm, z_bg: torch.Tensor, cond: torch.Tensor, subtype: Any, hist: Any, *,
                   steps: int | None = None, seed: int = 0, intermediates_every: int | None = None,
                   noise_background: bool | None = None, progress: bool = False
                   ) -> torch.Tensor | tuple[torch.Tensor, list[dict[str, Any]]]:
    """Algorithm 2 in latent space.

    Args:
        z_bg: background latents [B, c, l, l, l] (scaled, as ``vae.encode_latent``).
        cond: the 3-channel mask on the latent grid [B, 3, l, l, l]; channel 0 > 0 is the region M.
        subtype: int or [B] in {0, 1, 2}. hist: [bins] or [B, bins] summing to 1.
        steps: sampling steps (default ``cfg.hr_ldm.ddim_steps``).
        noise_background: re-anchor to ``q(z_bg, t-1)`` (True, the paper) or to ``z_bg`` (False);
            default ``cfg.hr_ldm.anchor_noise_background``.
    Returns:
        z_0 [B, c, l, l, l], equal to ``z_bg`` outside M bit for bit; with ``intermediates_every``,
        ``(z_0, intermediates)`` as :func:`lungsynth.diffusion.samplers.sample` returns them.
    """
    from lungsynth.diffusion.samplers import BackgroundAnchor, sample

    h = model.cfg.hr_ldm
    dev = model.device
    if cond.ndim != 5 or cond.shape[1] != 3 or cond.shape[0] != z_bg.shape[0] or cond.shape[2:] != z_bg.shape[2:]:
        raise ValueError(f"cond must be [B, 3, *latent] matching z_bg {tuple(z_bg.shape)}, got {tuple(cond.shape)}")
    B = z_bg.shape[0]
    y, hh = conditions(subtype, hist, B, h.hist_bins)
    y, hh = y.to(dev), hh.to(dev)
    z_bg, cond = z_bg.to(dev).float(), cond.to(dev).float()
    region = cond[:, :1] > 0
    if not bool(region.flatten(1).any(dim=1).all()):
        raise ValueError("the nodule mask is empty on the latent grid; give a non-empty nodule mask")
    gen = torch.Generator().manual_seed(int(seed))
    anchor = BackgroundAnchor(z_bg, region, model.scheduler, generator=torch.Generator().manual_seed(int(seed) + 1),
                              noise_background=h.anchor_noise_background if noise_background is None
                              else bool(noise_background))
    net = model.net.eval()
    return sample(lambda x, t: net(x, t, hh, y), model.scheduler, tuple(z_bg.shape),
                  steps or h.ddim_steps, generator=gen, device=dev, condition={"concat": cond},
                  step_callback=anchor, intermediates_every=intermediates_every, progress=progress,
                  desc="hr-ldm inpaint")


@torch.no_grad()
def inpaint_crops(model: HrLdm, ct: torch.Tensor, hrmask: torch.Tensor, subtype: Any, hist: Any, *,
                  steps: int | None = None, seed: int = 0, intermediates_every: int | None = None,
                  noise_background: bool | None = None) -> dict[str, Any]:
    """Inpaint nodules into crops on the [0, 1] scale.

    Args:
        ct: [B, 1, C, C, C] in [0, 1]; hrmask: [B, 3, C, C, C] {0, 1} (nodule, solid, ground-glass).
    Returns:
        ``{"ct": decoded [B,1,C,C,C] in [0,1], "z": z_0, "z_bg": z_bg, "region": voxel mask of the
        generated region [B,1,C,C,C] (latent M upsampled), "intermediates": [...] or None}``.
    """
    vae = model.vae
    dev = model.device
    ct, hrmask = ct.to(dev).float(), hrmask.to(dev).float()
    if ct.ndim != 5 or hrmask.shape[0] != ct.shape[0] or hrmask.shape[1] != 3 or hrmask.shape[2:] != ct.shape[2:]:
        raise ValueError(f"ct must be [B,1,C,C,C] and hrmask [B,3,C,C,C] of the same size; got {tuple(ct.shape)} "
                         f"and {tuple(hrmask.shape)}")
    z_bg = vae.encode_latent(ct, sample=False)
    cond = mask_to_latent(hrmask, vae.downsample)
    res = inpaint_latent(model, z_bg, cond, subtype, hist, steps=steps, seed=seed,
                         intermediates_every=intermediates_every, noise_background=noise_background)
    z, inter = res if intermediates_every else (res, None)
    inside = cond[:, :1] > 0
    for it in inter or []:  # the running estimate of the *inpainted* latent: x0-hat inside M, z_bg outside
        it["pred_x0"] = torch.where(inside.cpu(), it["pred_x0"], z_bg.cpu())
    out = vae.decode_latent(z).clamp(0.0, 1.0)
    region = F.interpolate((cond[:, :1] > 0).float(), scale_factor=vae.downsample, mode="nearest")
    return {"ct": out, "z": z, "z_bg": z_bg, "region": region, "intermediates": inter}


# --------------------------------------------------------------------------- where


def candidate_centres(lung: np.ndarray, margin_vox: float, *, subpleural: bool = False,
                      exclude: np.ndarray | None = None, exclude_margin_vox: float = 0.0) -> np.ndarray:
    """Voxel indices [N, 3] where a nodule centre may go (Sec. 3.3, step 1).

    The inner region is every lung voxel farther than ``margin_vox`` from the lung boundary (Euclidean
    distance transform, so the erosion is by a ball): parenchymal nodules. ``subpleural`` takes the
    rim instead, the lung minus that inner region. ``exclude`` (a mask of existing nodules, [D, H, W])
    removes every voxel within ``exclude_margin_vox`` of one, so a new nodule never lands on an old one.
    """
    from scipy import ndimage

    lu = np.asarray(lung) > 0
    if lu.ndim != 3:
        raise ValueError(f"lung mask must be [D, H, W], got shape {lu.shape}")
    if not lu.any():
        raise ValueError("the lung mask is empty; pass the scan's lung mask (prepared 'lung' volume)")
    inner = ndimage.distance_transform_edt(lu) > margin_vox
    keep = (lu & ~inner) if subpleural else inner
    if exclude is not None and np.asarray(exclude).any():
        ex = np.asarray(exclude) > 0
        if ex.shape != lu.shape:
            raise ValueError(f"exclude mask {ex.shape} does not match the lung mask {lu.shape}")
        keep &= ndimage.distance_transform_edt(~ex) > exclude_margin_vox
    idx = np.argwhere(keep)
    if idx.size == 0:
        where = "in the sub-pleural rim" if subpleural else f"more than {margin_vox:.1f} voxels from the pleura"
        raise ValueError(f"no lung voxel {where}{' away from the existing nodules' if exclude is not None else ''}; "
                         f"use a smaller nodule or a smaller hr_ldm.lung_erosion_mm")
    return idx


def sample_centre(lung: np.ndarray, radius_mm: float, spacing_mm: float, rng: np.random.Generator,
                  erosion_mm: float = 4.0, subpleural: bool = False, exclude: np.ndarray | None = None
                  ) -> tuple[int, int, int]:
    """One centre drawn uniformly from :func:`candidate_centres`: the erosion margin is radius + erosion (in
    voxels), and existing nodules (``exclude``) are kept one radius + erosion away."""
    margin = (float(radius_mm) + float(erosion_mm)) / float(spacing_mm)
    idx = candidate_centres(lung, margin, subpleural=subpleural, exclude=exclude, exclude_margin_vox=margin)
    return tuple(int(v) for v in idx[rng.integers(len(idx))])  # type: ignore[return-value]


# --------------------------------------------------------------------------- what shape


@dataclasses.dataclass
class NoduleLibrary:
    """Real nodule masks (bounding-box crops of the 3-channel hrmask at the model's crop spacing), their
    subtype, diameter and
    HU histogram: the shapes and target histograms Algorithm 2 draws from."""

    masks: list[np.ndarray]  # each uint8 [3, a, b, c]
    subtypes: np.ndarray  # [N] int
    diameters_mm: np.ndarray  # [N] float
    histograms: np.ndarray  # [N, bins]
    nodule_ids: list[str]

    def __len__(self) -> int:
        return len(self.masks)

    @classmethod
    def from_crops(cls, items: Iterable[Mapping[str, Any]], cfg: Any,
                   size_range_mm: tuple[float, float] | None = None) -> "NoduleLibrary":
        """From CropDataset-like items (ct [1,C,C,C] in [0,1], hrmask [3,C,C,C], subtype_id, diameter_mm), keeping
        the nodules of diameter in ``size_range_mm`` (default ``cfg.hr_ldm.size_range_mm``, the paper's 6-30 mm)."""
        lo, hi = size_range_mm or tuple(cfg.hr_ldm.size_range_mm)
        masks, subs, diams, hists, ids = [], [], [], [], []
        for it in items:
            hr = np.asarray(torch.as_tensor(it["hrmask"]).numpy() if torch.is_tensor(it["hrmask"]) else it["hrmask"])
            nod = hr[0] > 0
            if not nod.any():
                continue
            diameter = float(it.get("diameter_mm", 2.0 * (3.0 * nod.sum() / (4 * np.pi)) ** (1 / 3)))
            if not lo <= diameter <= hi:
                continue
            sl = tuple(slice(int(a.min()), int(a.max()) + 1) for a in np.nonzero(nod))
            masks.append(hr[(slice(None),) + sl].astype(np.uint8))
            subs.append(int(it["subtype_id"]))
            diams.append(diameter)
            ct = torch.as_tensor(it["ct"]).float()[0]
            hists.append(hu_histogram(unit_to_hu(ct, cfg), torch.as_tensor(nod), cfg.hr_ldm.hist_bins,
                                      tuple(cfg.hr_ldm.hist_range_hu)))
            ids.append(str(it.get("nodule_id", len(ids))))
        if not masks:
            raise ValueError(f"no nodule of {lo:g}-{hi:g} mm with a non-empty mask in the crops; the library needs "
                             f"real nodules (hr_ldm.size_range_mm)")
        return cls(masks, np.array(subs), np.array(diams), np.stack(hists), ids)

    @classmethod
    def from_prepared(cls, cfg: Any, split: str = "train") -> "NoduleLibrary":
        """Every 6-30 mm nodule of ``split`` of the prepared dataset (``CropDataset`` at the model's crop side)."""
        from lungsynth.data.datasets import CropDataset, ensure_prepared

        ensure_prepared(cfg)
        ds = CropDataset(cfg, split, size=crop_side(cfg))
        return cls.from_crops((ds[i] for i in range(len(ds))), cfg)

    def has(self, subtype: int, size_range_mm: tuple[float, float] | None = None) -> bool:
        """Whether a shape of ``subtype`` (and diameter in ``size_range_mm``) exists."""
        return bool(self._matching(subtype, size_range_mm).any())

    def _matching(self, subtype: int, size_range_mm: tuple[float, float] | None) -> np.ndarray:
        keep = self.subtypes == int(subtype)
        if size_range_mm is not None:
            keep &= (self.diameters_mm >= size_range_mm[0]) & (self.diameters_mm < size_range_mm[1])
        return keep

    def draw_shape(self, rng: np.random.Generator, size_range_mm: tuple[float, float] | None = None,
                   subtype: int | None = None) -> int:
        """Index of a real shape of ``subtype`` with diameter in ``size_range_mm`` (Sec. 3.3, step 2). There is no
        fallback to another subtype or size: when none exists the error names both."""
        if subtype is None:
            keep = np.ones(len(self), bool) if size_range_mm is None else \
                (self.diameters_mm >= size_range_mm[0]) & (self.diameters_mm < size_range_mm[1])
        else:
            keep = self._matching(int(validate_subtype(subtype)[0]), size_range_mm)
        idx = np.flatnonzero(keep)
        if idx.size == 0:
            what = "any subtype" if subtype is None else SUBTYPES[int(subtype)]
            size = "" if size_range_mm is None else f" of {size_range_mm[0]:g}-{size_range_mm[1]:g} mm"
            have = sorted(f"{d:.1f}" for d in self.diameters_mm[self.subtypes == subtype]) if subtype is not None else []
            raise ValueError(f"the nodule library has no {what} nodule{size} (its {what} diameters: "
                             f"{', '.join(have) or 'none'} mm); choose another size range or subtype")
        return int(idx[rng.integers(idx.size)])

    def target_histogram(self, subtype: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """A real nodule's HU histogram of ``subtype`` (random one with ``rng``, else the subtype mean)."""
        validate_subtype(subtype)
        keep = self.subtypes == int(subtype)
        if not keep.any():
            raise ValueError(f"the nodule library has no {SUBTYPES[int(subtype)]} nodule to take a target histogram "
                             f"from; pass histogram= explicitly")
        h = self.histograms[keep].mean(axis=0) if rng is None else self.histograms[rng.choice(np.flatnonzero(keep))]
        return h / h.sum()


def place_mask(shape_mask: np.ndarray, side: int, flip: Sequence[bool] = (False, False, False)) -> np.ndarray:
    """Centre a bounding-box mask [3, a, b, c] in a cube [3, side, side, side] (cropping what overflows)."""
    m = shape_mask[(slice(None),) + tuple(slice(None, None, -1 if f else 1) for f in flip)]
    out = np.zeros((m.shape[0], side, side, side), np.uint8)
    src, dst = [], []
    for n in m.shape[1:]:
        start = (side - n) // 2
        s0, d0 = max(0, -start), max(0, start)
        length = min(n - s0, side - d0)
        src.append(slice(s0, s0 + length))
        dst.append(slice(d0, d0 + length))
    out[(slice(None),) + tuple(dst)] = m[(slice(None),) + tuple(src)]
    return out


# --------------------------------------------------------------------------- crops of a volume


def _window(centre: Sequence[int], n: int, shape: Sequence[int]) -> tuple[list[slice], list[tuple[int, int]]]:
    """Slices of a cube of side ``n`` centred at ``centre`` clipped to ``shape``, and the padding needed."""
    sl, pad = [], []
    for c, s in zip(centre, shape):
        a = int(c) - n // 2
        b = a + n
        sl.append(slice(max(a, 0), min(b, s)))
        pad.append((max(0, -a), max(0, b - s)))
    return sl, pad


def _resize(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size and x.shape[-3] == size:
        return x
    kw = {"align_corners": False} if mode == "trilinear" else {}
    return F.interpolate(x, size=(size,) * 3, mode=mode, **kw)


def _downsample_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """[1, K, C, C, C] {0,1} -> [1, K, n, n, n] bool: voxels at least half covered; a channel whose nodule is
    smaller than half a coarse voxel keeps its best-covered voxel(s), so a small nodule never vanishes."""
    frac = _resize(mask, size, "area")
    out = frac > 0.5
    for k in range(frac.shape[1]):
        peak = frac[0, k].max()
        if peak > 0 and not out[0, k].any():
            out[0, k] = frac[0, k] >= peak
    return out


@dataclasses.dataclass
class InpaintResult:
    """One nodule inpainted into a volume (everything in the volume's grid unless said otherwise)."""

    ct_hu: np.ndarray  # [D, H, W] the new volume (HU)
    nodule_mask: np.ndarray  # [D, H, W] uint8, the placed nodule (channel 0 of hrmask)
    hrmask: np.ndarray  # [3, D, H, W] uint8
    region: np.ndarray  # [D, H, W] uint8, where the volume changed (the generated latent region)
    centre: tuple[int, int, int]
    subtype: int
    diameter_mm: float  # the real nodule's recorded diameter when its shape came from a library, else extent_mm
    target_histogram: np.ndarray  # [bins]
    generated_histogram: np.ndarray  # [bins], HU histogram of the generated nodule (crop grid)
    crop_before: np.ndarray  # [C, C, C] HU at 1 mm
    crop_after: np.ndarray  # [C, C, C] HU at 1 mm (decoded)
    crop_mask: np.ndarray  # [C, C, C] uint8
    delta_hu_outside: float  # mean |decoded - input| outside the nodule in the crop (HU)
    subpleural: bool = False  # centred in the sub-pleural rim (else in the eroded lung)
    intermediates: list[dict[str, Any]] | None = None
    extent_mm: float = 0.0  # the shape's largest bounding-box side, what placement keeps inside the lung


CENTRE_TRIES = 20  # centres drawn before a nodule that never fits the lung is an error


def latent_region(crop_mask: np.ndarray, factor: int) -> np.ndarray:
    """Where inpainting changes a crop: the nodule channel max-pooled to the latent grid (the M of eq. 10) and
    upsampled back, [C, C, C] bool; known before any sampling."""
    m = torch.from_numpy(np.ascontiguousarray(crop_mask[:1] > 0)).float()[None]
    pooled = F.max_pool3d(m, factor)
    return F.interpolate(pooled, scale_factor=factor, mode="nearest")[0, 0].numpy() > 0


def inpaint_volume(model: HrLdm, ct_hu: np.ndarray, lung: np.ndarray, subtype: int, *, spacing_mm: float,
                   library: NoduleLibrary | None = None, centre: Sequence[int] | None = None,
                   shape: np.ndarray | None = None, histogram: np.ndarray | None = None,
                   size_range_mm: tuple[float, float] | None = None, subpleural: bool = False,
                   exclude: np.ndarray | None = None, seed: int = 0, steps: int | None = None,
                   intermediates_every: int | None = None) -> InpaintResult:
    """Inpaint one nodule of ``subtype`` into a CT volume (Algorithm 2, steps 1-5).

    Args:
        ct_hu: [D, H, W] in HU, ideally a healthy scan (the prepared ``healthy`` twin on phantom data);
            lung: [D, H, W] lung mask; spacing_mm: the volume's isotropic spacing.
        subtype: 0 solid, 1 part-solid, 2 ground-glass.
        library: real nodules for the shape and target histogram (needed unless both ``shape`` and
            ``histogram`` are given).
        centre: voxel (d, h, w); default drawn inside the eroded lung, or in the sub-pleural rim with
            ``subpleural`` (the shape is then clipped at the pleura).
        shape: hrmask [3, a, b, c] at the model's crop spacing (a library entry); default drawn from ``library``
            (of ``subtype`` and ``size_range_mm``, default the library's whole 6-30 mm).
        histogram: target [bins] summing to 1; default a real nodule of ``subtype`` from ``library``.
        exclude: [D, H, W] mask of nodules already in the scan (real LIDC data): drawn centres keep away from
            them and the changed region never touches one.
        seed: seeds the choices and the sampler.
    Returns:
        :class:`InpaintResult`. Raises ValueError for a bad subtype or histogram, a shape the library lacks,
        or a nodule that falls outside the lung or onto an existing one.
    """
    cfg = model.cfg
    y = int(validate_subtype(subtype)[0])
    ct_hu = np.asarray(ct_hu, dtype=np.float32)
    lu = np.asarray(lung) > 0
    if ct_hu.ndim != 3 or lu.shape != ct_hu.shape:
        raise ValueError(f"ct_hu {ct_hu.shape} and lung {lu.shape} must be [D, H, W] volumes of the same shape")
    ex = None if exclude is None else np.asarray(exclude) > 0
    if ex is not None and ex.shape != ct_hu.shape:
        raise ValueError(f"exclude {ex.shape} must be a [D, H, W] mask like ct_hu {ct_hu.shape}")
    rng = np.random.default_rng(seed)
    if histogram is None:
        if library is None:
            raise ValueError("pass histogram= or a NoduleLibrary (NoduleLibrary.from_prepared(cfg))")
        histogram = library.target_histogram(y, rng)
    target = validate_histogram(histogram, cfg.hr_ldm.hist_bins)[0]
    recorded = None  # a library shape keeps its real nodule's recorded diameter, as real rows report theirs
    if shape is None:
        if library is None:
            raise ValueError("pass shape= (a [3, a, b, c] nodule mask at 1 mm) or a NoduleLibrary")
        drawn_shape = library.draw_shape(rng, size_range_mm, y)
        shape, recorded = library.masks[drawn_shape], float(library.diameters_mm[drawn_shape])
    shape = np.asarray(shape)
    if shape.ndim != 4 or shape.shape[0] != 3 or not (shape[0] > 0).any():
        raise ValueError(f"shape must be a non-empty 3-channel nodule mask [3, a, b, c]; got {shape.shape}")
    extent = float(max(shape.shape[1:]) * model.crop_spacing_mm)  # what placement keeps inside the lung
    # the reported diameter: a shape given by hand has only its extent, but the extent of a 6 mm LIDC nodule's mask
    # can be 5 voxels, which a 6-30 mm filter downstream drops (measured: 32 of 237 course nodules, before)
    diameter = recorded if recorded is not None else extent
    side = model.side
    win = max(1, int(round(side * model.crop_spacing_mm / float(spacing_mm))))  # crop side in volume voxels
    drawn = centre is None
    # a drawn centre keeps a ball of the nodule's radius inside the eroded lung, but the placed mask (an
    # elongated shape, flipped, on a lung resampled to the crop grid) can still leave a thin lung: draw again
    for attempt in range(CENTRE_TRIES if drawn else 1):
        try:
            if drawn:
                centre = sample_centre(lu, extent / 2, spacing_mm, rng, cfg.hr_ldm.lung_erosion_mm, subpleural, ex)
            centre = tuple(int(c) for c in centre)
            if any(not 0 <= c < s for c, s in zip(centre, ct_hu.shape)):
                raise ValueError(f"centre {centre} lies outside the volume {ct_hu.shape}")
            crop_mask = place_mask(shape, side, tuple(bool(b) for b in rng.integers(0, 2, 3)))
            sl, pad = _window(centre, win, ct_hu.shape)
            inner = tuple(slice(p[0], win - p[1]) for p in pad)
            lung_win = np.pad(lu[tuple(sl)], pad)
            lung_crop = _resize(torch.from_numpy(lung_win.astype(np.float32))[None, None], side, "trilinear")[0, 0] > 0.5
            if subpleural:  # a sub-pleural nodule is bounded by the pleura
                crop_mask = crop_mask * lung_crop.numpy()[None].astype(np.uint8)
            validate_mask_in_lung(crop_mask[0], lung_crop.numpy(), what="nodule mask at the chosen centre")
            region_crop = latent_region(crop_mask, model.vae.downsample)
            region_win = _volume_grid(region_crop, crop_mask, win, side)
            if ex is not None and (region_win[inner] & ex[tuple(sl)]).any():
                raise ValueError(f"the nodule at centre {centre} would overwrite a nodule already in the scan; "
                                 f"choose another centre (a drawn one keeps away from `exclude`)")
            break
        except ValueError as exc:
            if not drawn or attempt == CENTRE_TRIES - 1:
                raise ValueError(f"{exc} ({attempt + 1} centre(s) drawn)" if drawn else str(exc)) from None
    ct_win = np.pad(ct_hu[tuple(sl)], pad, mode="edge")
    ct_crop = _resize(torch.from_numpy(ct_win)[None, None], side, "trilinear")
    x = hu_to_unit(ct_crop, cfg)
    out = inpaint_crops(model, x, torch.from_numpy(crop_mask)[None].float(), y, target[None], steps=steps, seed=seed,
                        intermediates_every=intermediates_every)
    nod = torch.from_numpy(crop_mask[:1]).bool()[None]
    before_hu = unit_to_hu(x.cpu(), cfg)
    after_hu = unit_to_hu(out["ct"].cpu(), cfg)
    delta = float((after_hu - before_hu).abs()[~nod].mean())
    # Paste: only the generated region changes; resample back to the volume grid when the spacings differ.
    after_win = _resize(after_hu, win, "area") if win != side else after_hu
    nod_win = _downsample_mask(torch.from_numpy(crop_mask).float()[None], win) if win != side else \
        torch.from_numpy(crop_mask)[None] > 0
    new = ct_hu.copy()
    reg = region_win[inner]
    new_win = new[tuple(sl)]
    new_win[reg] = after_win[0, 0].numpy()[inner][reg]
    region_vol = np.zeros(ct_hu.shape, np.uint8)
    region_vol[tuple(sl)] = reg
    hr_vol = np.zeros((3,) + ct_hu.shape, np.uint8)
    hr_vol[(slice(None),) + tuple(sl)] = nod_win[0].numpy()[(slice(None),) + inner]
    gen_hist = hu_histogram(after_hu[0, 0], crop_mask[0], cfg.hr_ldm.hist_bins, tuple(cfg.hr_ldm.hist_range_hu))
    return InpaintResult(ct_hu=new, nodule_mask=hr_vol[0].copy(), hrmask=hr_vol, region=region_vol, centre=centre,
                         subtype=y, diameter_mm=diameter, target_histogram=target.numpy().astype(np.float64),
                         generated_histogram=gen_hist, crop_before=before_hu[0, 0].numpy(),
                         crop_after=after_hu[0, 0].numpy(), crop_mask=crop_mask[0], delta_hu_outside=delta,
                         subpleural=bool(subpleural), intermediates=out["intermediates"],
                         extent_mm=extent)


def _volume_grid(region_crop: np.ndarray, crop_mask: np.ndarray, win: int, side: int) -> np.ndarray:
    """The changed region on the volume's window grid [win, win, win] bool: the latent region resampled, plus the
    labelled nodule (always part of what is pasted)."""
    reg = torch.from_numpy(region_crop.astype(np.float32))[None, None]
    region_win = (_resize(reg, win, "area") > 0.5) if win != side else reg > 0.5
    nod_win = _downsample_mask(torch.from_numpy(crop_mask).float()[None], win) if win != side else \
        torch.from_numpy(crop_mask)[None] > 0
    return (region_win[0, 0] | nod_win[0, 0]).numpy()
