"""``prepare``: LIDC DICOM (real or phantom) -> isotropic NIfTI volumes, masks, views, manifest.

Per scan (:func:`prepare_scan`):

1. DICOM -> HU exactly as ``pylidc.Scan.to_volume`` does (``load_all_dicom_images``, pixel *
   slope + intercept), keeping the slice positions so uneven spacing and missing slices are
   resampled by their real z (and reported);
2. consistent orientation: saved arrays are (D, H, W) = (superior -> inferior, anterior ->
   posterior, patient right -> left), i.e. axial slices ``vol[d]`` display as radiologists
   view them; the NIfTI affine maps indices to RAS millimetres;
3. isotropic resampling at ``cfg.data.spacing_3d_mm`` (in-plane antialiased, z linear);
4. lung mask (:mod:`lungsynth.data.masks`); nodule label map from pylidc's 50% consensus of
   each clustered nodule (label k for the k-th kept nodule; a nodule smaller than a voxel
   keeps its centre voxel);
5. LAND condition (0 background, lung 0.5, nodule texture 1..5, all divided by 5) and the
   3-channel HR-LDM mask (nodule, solid core, ground-glass part: texture 4-5 all core, 1-2
   all ground glass, 3 split at -300 HU);
6. crop or pad (air, -1000 HU) to a cube of ``cfg.data.size_3d`` around the lungs, shifted to
   keep the nodules when they fit;
7. views from the native-resolution HU: the whole axial slice through each nodule centre resized
   to ``size_2d`` square (square box mask; its pixel side, the field of view / ``size_2d``, is
   recorded), ROIs of side 2 x the diameter (``roi_size``), nodule-centred crops of ``crop_size``
   voxels at 1 mm;
8. a phantom scan also gets its healthy twin (``healthy``: the same scan rendered without its
   nodules, resampled and cropped as ``ct``; each nodule crop gets the same cube of it, ``healthy``), the
   background HR-LDM inpaints into (its paper's Sec. 3.3); real LIDC scans have no healthy twin, and the
   column stays empty.

Source DICOM is only read. Outputs are written under temporary names and renamed, and a
scan's record (``records/<scan_id>.json``) is written last, so an interrupted prepare
resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

# Bump when preparation output changes (mask method, views): older records are then prepared again.
# 2: lung mask keeps lungs that reach the field-of-view edge; 3: and parenchymal islands; 4: whole 2D slices;
# 5: a phantom scan's healthy twin; 6: ROIs of side exactly 2 x diameter (no 16 mm floor)
PREPARE_VERSION = 6
ROI_SIDE_PER_DIAMETER = 2.0  # Urata et al. §2.2: each side of the ROI is twice the nodule's maximum diameter
CROP_SPACING_MM = 1.0  # the nodule-centred 3D crops are at 1 mm (chapters 05, 11)
SOLID_CORE_HU = -300.0


# --------------------------------------------------------------------------- intensities


def hu_to_unit(x: Any, hu_min: float = -1000.0, hu_max: float = 400.0) -> Any:
    """HU -> [0, 1]: clip to [hu_min, hu_max] and scale (numpy array or torch tensor)."""
    y = (x - hu_min) / (hu_max - hu_min)
    return y.clip(0.0, 1.0) if hasattr(y, "clip") else min(max(y, 0.0), 1.0)


def unit_to_hu(x: Any, hu_min: float = -1000.0, hu_max: float = 400.0) -> Any:
    """[0, 1] -> HU (inverse of :func:`hu_to_unit` inside the clip range)."""
    return x * (hu_max - hu_min) + hu_min


# --------------------------------------------------------------------------- reading DICOM


@dataclass
class CTVolume:
    """A scan in native geometry: ``hu`` [K, rows, cols] float32, slices sorted by z ascending."""

    hu: np.ndarray
    zs: np.ndarray  # [K] slice positions (mm)
    pixel_spacing: float
    origin_xy: tuple[float, float]  # ImagePositionPatient x, y of pixel (0, 0)
    source: str  # "phantom" | "dicom"
    series_dir: str
    notes: list[str] = field(default_factory=list)

    def z_to_index(self, z: np.ndarray) -> np.ndarray:
        """Fractional slice index of physical z (mm), by the real slice positions."""
        return np.interp(z, self.zs, np.arange(len(self.zs), dtype=np.float64))


def _name_corrupt_file(series_dir: str, exc: Exception) -> ValueError:
    import pydicom

    for name in sorted(os.listdir(series_dir)):
        if not name.endswith(".dcm") or name.startswith("."):
            continue
        path = os.path.join(series_dir, name)
        try:
            ds = pydicom.dcmread(path)
            _ = ds.pixel_array
        except Exception as inner:
            return ValueError(f"corrupt DICOM file {path}: {type(inner).__name__}: {inner}; "
                              "re-download it, or leave this scan out with --scans")
    return ValueError(f"cannot read the DICOM series in {series_dir}: {type(exc).__name__}: {exc}")


def load_ct(scan: Any) -> CTVolume:
    """Read ``scan``'s DICOM through pylidc (the DICOM root must be set, see ``lidc.use_dicom_root``).

    Raises FileNotFoundError when the scan has no DICOM under the root, ValueError naming the
    file when one is corrupt.
    """
    try:
        series_dir = scan.get_path_to_dicom_files()
    except (RuntimeError, IOError, OSError) as exc:
        raise FileNotFoundError(f"no DICOM for {scan.patient_id} (series {scan.series_instance_uid}): {exc}") from exc
    try:
        images = scan.load_all_dicom_images(verbose=False)
    except Exception as exc:
        raise _name_corrupt_file(series_dir, exc) from exc
    if not images:
        raise FileNotFoundError(f"no DICOM slices of series {scan.series_instance_uid} in {series_dir}")
    slices = []
    for img in images:
        try:
            slices.append(img.pixel_array.astype(np.float32) * float(img.RescaleSlope) + float(img.RescaleIntercept))
        except Exception as exc:
            raise ValueError(f"corrupt DICOM file {getattr(img, 'filename', series_dir)}: "
                             f"{type(exc).__name__}: {exc}; re-download it") from exc
    shapes = {s.shape for s in slices}
    if len(shapes) != 1:
        raise ValueError(f"DICOM series {series_dir} mixes image sizes {sorted(shapes)}")
    hu = np.stack(slices, axis=0)
    # pylidc's to_volume casts to int16: keep that rounding so both paths agree exactly.
    hu = hu.astype(np.int16).astype(np.float32)
    zs = np.array([float(img.ImagePositionPatient[2]) for img in images])
    ps = float(images[0].PixelSpacing[0])
    origin = (float(images[0].ImagePositionPatient[0]), float(images[0].ImagePositionPatient[1]))
    desc = str(getattr(images[0], "SeriesDescription", ""))
    notes = []
    if len(zs) > 2:
        dz = np.diff(zs)
        med = float(np.median(dz))
        if np.any(dz > 1.5 * med):
            notes.append(f"{int(np.sum(dz > 1.5 * med))} gap(s) in slice positions (max {dz.max():.2f} mm, "
                         f"median {med:.2f} mm): interpolated across")
        elif dz.max() - dz.min() > 0.05 * med:
            notes.append(f"uneven slice spacing {dz.min():.2f}..{dz.max():.2f} mm: resampled by position")
    db_n = len(scan.slice_zvals)
    if db_n != len(zs):
        notes.append(f"DICOM has {len(zs)} slices, pylidc's database {db_n}: annotations mapped by z")
    return CTVolume(hu, zs, ps, origin, "phantom" if desc.startswith("lungsynth phantom") else "dicom",
                    series_dir, notes)


def healthy_twin(scan: Any, ct: CTVolume) -> CTVolume | None:
    """A phantom scan without its nodules, read as :func:`load_ct` reads its DICOM (the same slices, by
    position); None for real LIDC DICOM (no healthy twin exists) and for a phantom series whose record is
    missing (a note says so).

    The twin is rebuilt from ``twins/<scan>.npz`` at the DICOM root (the values where it differs from the
    scan, written with the DICOM); a series rendered before those files existed is rendered again from its
    ``phantom.json`` settings. A twin of another seed or phantom version than the series is an error that
    names the series.
    """
    if ct.source != "phantom":
        return None
    from lungsynth.data.lidc import scan_key
    from lungsynth.data.phantom import twin_path

    root = Path(ct.series_dir).parents[2]
    try:
        rec = json.loads((root / "phantom.json").read_text())["scans"][scan_key(scan)]
    except (OSError, KeyError, ValueError) as exc:
        ct.notes.append(f"no healthy twin: {root / 'phantom.json'} has no record of this phantom ({type(exc).__name__})")
        return None
    path = twin_path(root, scan_key(scan))
    if not path.is_file():
        return _rendered_twin(scan, ct, rec)
    with np.load(path) as z:
        if (int(z["seed"]), int(z["version"])) != (int(rec["seed"]), int(rec.get("version", z["version"]))):
            raise ValueError(f"the healthy twin {path} (seed {int(z['seed'])}, phantom v{int(z['version'])}) is not "
                             f"that of phantom series {ct.series_dir} (seed {rec['seed']}, v{rec.get('version')}); "
                             f"re-render it with `lungsynth data phantom --force`")
        index, stored, zs = z["index"], z["stored"], z["zs"]
        plane = int(z["shape"][1]) * int(z["shape"][2])
    k, rest = np.divmod(index, plane)
    dicom_k = np.abs(ct.zs[None, :] - zs[k][:, None]).argmin(axis=1)  # by position: a slice may be missing
    keep = np.abs(ct.zs[dicom_k] - zs[k]) < 1e-3
    hu = ct.hu.copy()
    hu.reshape(len(ct.zs), -1)[dicom_k[keep], rest[keep]] = stored[keep].astype(np.float32) - 1024.0
    return CTVolume(hu, ct.zs, ct.pixel_spacing, ct.origin_xy, ct.source, ct.series_dir, list(ct.notes))


def _rendered_twin(scan: Any, ct: CTVolume, rec: dict[str, Any]) -> CTVolume:
    """The twin rendered again from the phantom's settings (series rendered before twin files existed)."""
    from lungsynth.data.lidc import slice_zvals
    from lungsynth.data.phantom import render_scan, stored_values

    vol, _ = render_scan(scan, seed=int(rec["seed"]), noise_hu=float(rec["noise_hu"]),
                         render_matrix=int(rec["render_matrix"]), with_nodules=False)
    zs = np.asarray(slice_zvals(scan), dtype=np.float64)
    pick = np.abs(zs[None, :] - ct.zs[:, None]).argmin(axis=1)  # the DICOM's slices (one may be missing)
    hu = stored_values(vol[pick]).astype(np.float32) - 1024.0  # as written and read back
    changed = float(np.mean(hu != ct.hu)) if hu.shape == ct.hu.shape else 1.0
    if changed > 0.01:  # nodules cover far less than 1% of a scan
        raise ValueError(f"the healthy twin of phantom series {ct.series_dir} differs from its DICOM in "
                         f"{changed:.1%} of voxels: it was rendered by another phantom version or setting; "
                         f"re-render it with `lungsynth data phantom --force`")
    return CTVolume(hu, ct.zs, ct.pixel_spacing, ct.origin_xy, ct.source, ct.series_dir, list(ct.notes))


# --------------------------------------------------------------------------- resampling


@dataclass
class Grid:
    """The isotropic grid of the prepared volume, before (offset 0) or after cropping.

    Voxel (d, h, w) sits at z = z_top - (d + d0) s, row i = (h + h0 + 0.5) s / ps - 0.5,
    col j = (w + w0 + 0.5) s / ps - 0.5 of the native image.
    """

    spacing: float
    pixel_spacing: float
    origin_xy: tuple[float, float]
    z_top: float
    shape: tuple[int, int, int]
    offset: tuple[int, int, int] = (0, 0, 0)

    def native(self, d: np.ndarray, h: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row i, col j, z mm) of grid indices."""
        s, ps = self.spacing, self.pixel_spacing
        i = (h + self.offset[1] + 0.5) * s / ps - 0.5
        j = (w + self.offset[2] + 0.5) * s / ps - 0.5
        z = self.z_top - (d + self.offset[0]) * s
        return i, j, z

    def from_native(self, i: float, j: float, z: float) -> np.ndarray:
        """Fractional (d, h, w) of a native (row, col, z mm) position."""
        s, ps = self.spacing, self.pixel_spacing
        return np.array([(self.z_top - z) / s - self.offset[0], (i + 0.5) * ps / s - 0.5 - self.offset[1],
                         (j + 0.5) * ps / s - 0.5 - self.offset[2]])

    def affine(self) -> np.ndarray:
        """4x4 voxel (d, h, w) -> RAS mm (DICOM is LPS: x and y change sign)."""
        s, ps = self.spacing, self.pixel_spacing
        x0 = self.origin_xy[0] + (self.offset[2] + 0.5) * s - 0.5 * ps
        y0 = self.origin_xy[1] + (self.offset[1] + 0.5) * s - 0.5 * ps
        z0 = self.z_top - self.offset[0] * s
        return np.array([[0, 0, -s, -x0], [0, -s, 0, -y0], [-s, 0, 0, z0], [0, 0, 0, 1]], dtype=np.float64)

    def cropped(self, start: Sequence[int], size: Sequence[int]) -> "Grid":
        return Grid(self.spacing, self.pixel_spacing, self.origin_xy, self.z_top, tuple(int(x) for x in size),
                    tuple(int(o + s) for o, s in zip(self.offset, start)))


def resample_inplane(hu: np.ndarray, pixel_spacing: float, spacing: float) -> np.ndarray:
    """[K, H, W] -> [K, H', W'] at ``spacing`` mm (antialiased bilinear, align_corners=False)."""
    import torch
    import torch.nn.functional as F

    scale = pixel_spacing / spacing
    with torch.no_grad():
        t = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))[:, None]
        out = F.interpolate(t, scale_factor=scale, mode="bilinear", align_corners=False,
                            antialias=scale < 1, recompute_scale_factor=False)
    return out[:, 0].numpy()


def resample_ct(ct: CTVolume, spacing: float) -> tuple[np.ndarray, Grid]:
    """Native CT -> isotropic HU [D, H, W] (superior first) at ``spacing`` mm, and its grid."""
    plane = resample_inplane(ct.hu, ct.pixel_spacing, spacing)
    z_top, z_bot = float(ct.zs.max()), float(ct.zs.min())
    D = int(math.floor((z_top - z_bot) / spacing + 1e-6)) + 1
    dz = float(np.median(np.diff(ct.zs))) if len(ct.zs) > 1 else spacing
    if spacing > 1.2 * dz:  # antialias along z before decimating
        plane = ndimage.gaussian_filter1d(plane, sigma=0.4 * spacing / dz, axis=0, mode="nearest")
    f = ct.z_to_index(z_top - np.arange(D) * spacing)
    k0 = np.clip(np.floor(f).astype(int), 0, len(ct.zs) - 1)
    k1 = np.clip(k0 + 1, 0, len(ct.zs) - 1)
    a = (f - k0).astype(np.float32)[:, None, None]
    vol = plane[k0] * (1 - a) + plane[k1] * a
    grid = Grid(spacing, ct.pixel_spacing, ct.origin_xy, z_top, vol.shape)
    return vol.astype(np.float32), grid


def crop_pad(arr: np.ndarray, start: Sequence[int], size: Sequence[int], fill: float = 0) -> np.ndarray:
    """``arr[start:start+size]`` on the first len(size) axes, padding with ``fill`` outside."""
    out = np.full(tuple(size) + arr.shape[len(size):], fill, dtype=arr.dtype)
    src, dst = [], []
    for st, sz, n in zip(start, size, arr.shape):
        lo, hi = max(st, 0), min(st + sz, n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - st, hi - st))
    out[tuple(dst)] = arr[tuple(src)]
    return out


def crop_window(lung: np.ndarray, size: int, keep: Sequence[np.ndarray] = ()) -> np.ndarray:
    """Start (d, h, w) of a ``size`` cube centred on the lungs, shifted to contain ``keep`` points."""
    idx = np.argwhere(lung)
    centre = (idx.min(0) + idx.max(0)) / 2 if len(idx) else np.array(lung.shape) / 2
    start = np.round(centre - size / 2).astype(int)
    if len(keep):
        pts = np.array(keep)
        lo, hi = np.floor(pts.min(0)).astype(int) - 1, np.ceil(pts.max(0)).astype(int) + 1
        for a in range(3):
            if hi[a] - lo[a] < size:
                start[a] = int(np.clip(start[a], hi[a] - size + 1, lo[a]))
    return start


# --------------------------------------------------------------------------- nodules


@dataclass
class Nodule:
    """One clustered nodule with its 50% consensus mask in pylidc's (i, j, k) index space."""

    index: int
    anns: list
    mask: np.ndarray  # bool [ni, nj, nk]
    bbox: tuple[slice, slice, slice]
    centroid_ijz: np.ndarray  # row, col (pixels), z (mm)
    scores: dict[str, int]
    reader_scores: list[dict[str, int]]
    diameter_mm: float
    volume_mm3: float


def scan_nodules(scan: Any, ct: CTVolume) -> tuple[list[Nodule], list[str]]:
    """Consensus nodules of ``scan``; ones outside the image or the DICOM's z range skipped with a reason."""
    from pylidc.utils import consensus

    from lungsynth.data.lidc import cluster_nodules
    from lungsynth.data.phantom import SCORE_NAMES, summarize_scores

    db_zs = np.sort(np.asarray(scan.slice_zvals, dtype=np.float64))
    rows, cols = ct.hu.shape[1:]
    out, skipped = [], []
    for idx, anns in enumerate(cluster_nodules(scan)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cmask, cbbox, _ = consensus(anns, clevel=0.5)
        except (IndexError, ValueError) as exc:
            skipped.append(f"nodule {idx}: consensus failed ({exc})")
            continue
        bi, bj, bk = cbbox
        if bi.start < 0 or bj.start < 0 or bi.stop > rows or bj.stop > cols or bk.start < 0 or bk.stop > len(db_zs):
            skipped.append(f"nodule {idx}: annotation outside the volume (bbox rows {bi.start}:{bi.stop}, cols "
                           f"{bj.start}:{bj.stop}, slices {bk.start}:{bk.stop} vs {rows}x{cols}x{len(db_zs)})")
            continue
        z_lo, z_hi = db_zs[bk.start], db_zs[bk.stop - 1]
        if z_lo < ct.zs.min() - 1e-3 or z_hi > ct.zs.max() + 1e-3:
            skipped.append(f"nodule {idx}: z {z_lo:.1f}..{z_hi:.1f} mm outside the DICOM's "
                           f"{ct.zs.min():.1f}..{ct.zs.max():.1f} mm")
            continue
        if not cmask.any():
            skipped.append(f"nodule {idx}: empty 50% consensus")
            continue
        com = np.array(ndimage.center_of_mass(cmask)) + np.array([bi.start, bj.start, bk.start])
        kz = float(np.interp(com[2], np.arange(len(db_zs)), db_zs))
        dz = float(np.median(np.diff(db_zs))) if len(db_zs) > 1 else float(scan.slice_thickness)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            diam = float(np.median([a.diameter for a in anns]))
        readers = [{n: int(getattr(a, n)) for n in SCORE_NAMES} for a in anns]
        out.append(Nodule(idx, anns, cmask, cbbox, np.array([com[0], com[1], kz]), summarize_scores(anns),
                          readers, diam, float(cmask.sum() * ct.pixel_spacing ** 2 * dz)))
    return out, skipped


def sample_nodule(nod: Nodule, db_zs: np.ndarray, i: np.ndarray, j: np.ndarray, z: np.ndarray,
                  smooth: tuple[float, float, float] = (0, 0, 0)) -> np.ndarray:
    """Fraction of the consensus mask at native positions (rows ``i``, cols ``j``, z mm), linear."""
    m = nod.mask.astype(np.float32)
    if any(smooth):
        pad = [(int(math.ceil(2 * s)) + 1,) * 2 for s in smooth]
        m = ndimage.gaussian_filter(np.pad(m, pad), smooth)
        offs = [b.start - p[0] for b, p in zip(nod.bbox, pad)]
    else:
        offs = [b.start for b in nod.bbox]
    k = np.interp(z, db_zs, np.arange(len(db_zs), dtype=np.float64))
    coords = np.stack([np.asarray(i, np.float64) - offs[0], np.asarray(j, np.float64) - offs[1],
                       k - offs[2]])
    return ndimage.map_coordinates(m, coords.reshape(3, -1), order=1, cval=0.0).reshape(np.shape(i))


def texture_split(nodule: np.ndarray, hu: np.ndarray, texture: int) -> tuple[np.ndarray, np.ndarray]:
    """(solid core, ground-glass part) of a nodule mask by its texture (and HU for part-solid)."""
    if texture >= 4:
        return nodule.copy(), np.zeros_like(nodule)
    if texture <= 2:
        return np.zeros_like(nodule), nodule.copy()
    core = nodule & (hu > SOLID_CORE_HU)
    if nodule.any() and not core.any():
        core.flat[np.argmax(np.where(nodule, hu, -np.inf))] = True
    return core, nodule & ~core


def subtype_of(texture: int) -> tuple[str, int]:
    """LIDC texture median -> (subtype, id): 1-2 ground-glass (2), 3 part-solid (1), 4-5 solid (0)."""
    if texture <= 2:
        return "ground-glass", 2
    if texture == 3:
        return "part-solid", 1
    return "solid", 0


# --------------------------------------------------------------------------- writing


def save_nifti(path: Path, arr: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".tmp_" + path.name)
    img = nib.Nifti1Image(arr, affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, tmp)
    os.replace(tmp, path)


def save_npz(path: Path, **arrays: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".tmp_" + path.name)
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp, path)


def whole_plane(plane: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """One native axial plane [rows, cols] padded with air to a centred square of side n = max(rows, cols) and
    resized to ``size`` x ``size`` (antialiased bilinear). Returns the image and the scale n / size (native
    pixels per output pixel)."""
    import torch
    import torch.nn.functional as F

    rows, cols = plane.shape
    n = max(rows, cols)
    square = np.full((n, n), -1000.0, dtype=np.float32)
    r0, c0 = (n - rows) // 2, (n - cols) // 2
    square[r0:r0 + rows, c0:c0 + cols] = plane
    with torch.no_grad():
        out = F.interpolate(torch.from_numpy(square)[None, None], size=(size, size), mode="bilinear",
                            align_corners=False, antialias=size < n)
    return out[0, 0].numpy(), n / size


def slice_view(ct: CTVolume, nod: Nodule, db_zs: np.ndarray, lung_fn: Any, size: int) -> dict[str, np.ndarray]:
    """The whole axial slice through the nodule centre resized to ``size`` square (Mari et al. §2.1: isotropic
    0.7 mm, whole slices resized to 256 x 256); the pixel side is ``spacing_mm`` = the field of view / ``size``.

    Returns image (HU float32 [size, size]), box/mask/lung (uint8 [size, size]), the box (r0, c0, r1, c1) in
    pixels, the native slice index and ``spacing_mm``.
    """
    k = int(np.clip(round(float(ct.z_to_index(nod.centroid_ijz[2]))), 0, len(ct.zs) - 1))
    z = float(ct.zs[k])
    image, step = whole_plane(ct.hu[k], size)
    rows, cols = ct.hu.shape[1:]
    n = max(rows, cols)
    # output pixel r covers padded native pixels around (r + 0.5) * step - 0.5; the plane starts (n - rows) // 2 in
    rr, cc = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    i = (rr + 0.5) * step - 0.5 - (n - rows) // 2
    j = (cc + 0.5) * step - 0.5 - (n - cols) // 2
    mask = sample_nodule(nod, db_zs, i, j, np.full(i.shape, z)) >= 0.5
    if not mask.any():  # smaller than a pixel: the pixel holding its centre
        rc = (nod.centroid_ijz[0] + (n - rows) // 2 + 0.5) / step - 0.5
        cc0 = (nod.centroid_ijz[1] + (n - cols) // 2 + 0.5) / step - 0.5
        mask[int(np.clip(round(rc), 0, size - 1)), int(np.clip(round(cc0), 0, size - 1))] = True
    idx = np.argwhere(mask)
    (a0, b0), (a1, b1) = idx.min(0), idx.max(0)
    side = max(a1 - a0, b1 - b0) + 1
    ca, cb = (a0 + a1) / 2, (b0 + b1) / 2
    box = np.zeros((size, size), dtype=np.uint8)
    ba0 = int(np.clip(round(ca - (side - 1) / 2), 0, size - side))
    bb0 = int(np.clip(round(cb - (side - 1) / 2), 0, size - side))
    box[ba0:ba0 + side, bb0:bb0 + side] = 1
    lung = lung_fn(i, j, np.full(i.shape, z))
    return {"image": image.astype(np.float32), "mask": mask.astype(np.uint8), "box": box,
            "lung": lung.astype(np.uint8), "box_rc": np.array([ba0, bb0, ba0 + side, bb0 + side]),
            "slice_index": np.array(k), "spacing_mm": np.array(step * ct.pixel_spacing, dtype=np.float32)}


def roi_view(ct: CTVolume, nod: Nodule, size: int) -> np.ndarray:
    """HU ROI [size, size] of side 2 x diameter on the nodule's centre slice (Urata et al. §2.2), so the nodule
    spans about half of it whatever its size (a 3 mm nodule is magnified as much as the paper's resizing does)."""
    k = int(np.clip(round(float(ct.z_to_index(nod.centroid_ijz[2]))), 0, len(ct.zs) - 1))
    side_px = ROI_SIDE_PER_DIAMETER * nod.diameter_mm / ct.pixel_spacing
    step = side_px / size
    plane = ct.hu[k]
    if step > 1.2:
        plane = ndimage.gaussian_filter(plane, 0.4 * step)
    t = (np.arange(size) + 0.5) * step - side_px / 2
    ii, jj = np.meshgrid(nod.centroid_ijz[0] + t, nod.centroid_ijz[1] + t, indexing="ij")
    return ndimage.map_coordinates(plane, np.stack([ii, jj]), order=1, cval=-1000.0).astype(np.float32)


def crop_view(ct: CTVolume, nod: Nodule, db_zs: np.ndarray, size: int, texture: int) -> dict[str, np.ndarray]:
    """Nodule-centred cube of ``size`` voxels at 1 mm: ct HU [C,C,C], mask [C,C,C], hrmask [3,C,C,C]."""
    t = (np.arange(size) - (size - 1) / 2) * CROP_SPACING_MM
    zz, yy, xx = np.meshgrid(nod.centroid_ijz[2] - t, t, t, indexing="ij")  # superior first
    i = nod.centroid_ijz[0] + yy / ct.pixel_spacing
    j = nod.centroid_ijz[1] + xx / ct.pixel_spacing
    k = ct.z_to_index(zz)
    hu = ndimage.map_coordinates(ct.hu, np.stack([k, i, j]).reshape(3, -1), order=1, cval=-1000.0).reshape(i.shape)
    mask = sample_nodule(nod, db_zs, i, j, zz) >= 0.5
    core, ggo = texture_split(mask, hu, texture)
    return {"ct": hu.astype(np.float32), "mask": mask.astype(np.uint8),
            "hrmask": np.stack([mask, core, ggo]).astype(np.uint8)}


# --------------------------------------------------------------------------- one scan


def prepare_scan(scan: Any, out_dir: Path, cfg: Any, lung_method: str = "classical") -> dict[str, Any]:
    """Prepare one scan into ``out_dir`` (= P). Returns its record (scan row, nodule rows, skips).

    The DICOM root must already be set (``lidc.use_dicom_root``). Raises FileNotFoundError when
    the scan has no DICOM, ValueError for a corrupt file.
    """
    from lungsynth.data.lidc import scan_key
    from lungsynth.data.masks import lung_mask

    t0 = time.perf_counter()
    dc = cfg.data
    key = scan_key(scan)
    ct = load_ct(scan)
    t_read = time.perf_counter()
    s = float(dc.spacing_3d_mm)
    vol, grid = resample_ct(ct, s)
    lung, method = lung_mask(vol, s, lung_method)
    db_zs = np.sort(np.asarray(scan.slice_zvals, dtype=np.float64))
    nodules, skipped = scan_nodules(scan, ct)

    # Nodule masks on the isotropic grid (smoothed first: a partial-volume estimate).
    sm = (0.35 * s / ct.pixel_spacing, 0.35 * s / ct.pixel_spacing, 0.35 * s / max(float(np.median(np.diff(db_zs))), 0.1))
    placed = []
    for nod in nodules:
        bi, bj, bk = nod.bbox
        lo = grid.from_native(bi.start - 1, bj.start - 1, db_zs[min(bk.stop - 1, len(db_zs) - 1)] + s)
        hi = grid.from_native(bi.stop, bj.stop, db_zs[bk.start] - s)
        lo = np.clip(np.floor(lo).astype(int), 0, np.array(vol.shape) - 1)
        hi = np.clip(np.ceil(hi).astype(int) + 1, 1, np.array(vol.shape))
        d, h, w = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
        i, j, z = grid.native(d, h, w)
        frac = sample_nodule(nod, db_zs, i, j, z, smooth=sm)
        sub = frac >= 0.5
        if not sub.any():
            sub.flat[np.argmax(frac)] = True
        placed.append((nod, (lo, hi, sub)))

    centres = [grid.from_native(*n.centroid_ijz) for n, _ in placed]
    start = crop_window(lung, int(dc.size_3d), centres)
    S = int(dc.size_3d)
    size = (S, S, S)
    cgrid = grid.cropped(start, size)
    ct_c = crop_pad(vol, start, size, fill=-1000.0)
    twin = healthy_twin(scan, ct)
    lung_c = crop_pad(lung.astype(np.uint8), start, size, fill=0)
    label_c = np.zeros(size, dtype=np.uint8)
    nod_rows, kept = [], 0
    for nod, (lo, hi, sub) in placed:
        full = np.zeros(vol.shape, dtype=bool)
        full[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = sub
        m = crop_pad(full, start, size, fill=False) & (label_c == 0)
        if not m.any():
            skipped.append(f"nodule {nod.index}: outside the {S}^3 crop around the lungs")
            continue
        kept += 1
        label_c[m] = kept
        cvox = np.array(ndimage.center_of_mass(m))
        sub_name, sub_id = subtype_of(nod.scores["texture"])
        nod_rows.append({
            "nodule_id": f"{key}_n{nod.index}", "scan_id": key, "patient_id": scan.patient_id,
            "label_value": kept, "centroid_vox_x": round(float(cvox[2]), 2),
            "centroid_vox_y": round(float(cvox[1]), 2), "centroid_vox_z": round(float(cvox[0]), 2),
            "centroid_row": round(float(nod.centroid_ijz[0]), 2), "centroid_col": round(float(nod.centroid_ijz[1]), 2),
            "centroid_z_mm": round(float(nod.centroid_ijz[2]), 2), "n_readers": len(nod.anns),
            "diameter_mm": round(nod.diameter_mm, 3), "volume_mm3": round(nod.volume_mm3, 2),
            "texture": nod.scores["texture"], "subtype": sub_name, "subtype_id": sub_id,
            "sphericity": nod.scores["sphericity"], "margin": nod.scores["margin"],
            "lobulation": nod.scores["lobulation"], "spiculation": nod.scores["spiculation"],
            "calcification": nod.scores["calcification"], "internal_structure": nod.scores["internalStructure"],
            "subtlety": nod.scores["subtlety"], "malignancy": nod.scores["malignancy"],
            "reader_scores": json.dumps(nod.reader_scores), "_nodule": nod})
    n_vox = int((label_c > 0).sum())
    in_lung = float(((lung_c > 0) & (label_c > 0)).sum() / n_vox) if n_vox else 1.0  # QA, before the union
    qa_notes = []
    if in_lung < 0.5:  # a lung mask that misses the nodules is almost always a failed mask
        qa_notes.append(f"QA: only {in_lung:.0%} of nodule voxels lie in the {method} lung mask; "
                        f"inspect it (lungsynth.viz) or prepare with --lung-mask lungmask")
        warnings.warn(f"{key}: {qa_notes[-1]}", stacklevel=2)
    lung_c = np.maximum(lung_c, (label_c > 0).astype(np.uint8))  # the nodules belong to the lungs
    cond = np.where(lung_c > 0, 0.5, 0.0).astype(np.float32)
    hr = np.zeros(size + (3,), dtype=np.uint8)
    for row in nod_rows:
        m = label_c == row["label_value"]
        cond[m] = row["texture"]
        core, ggo = texture_split(m, ct_c, row["texture"])
        hr[..., 0] |= m
        hr[..., 1] |= core
        hr[..., 2] |= ggo
    cond /= 5.0

    aff = cgrid.affine()
    vols = out_dir / "volumes"
    paths = {k: f"volumes/{key}_{k}.nii.gz" for k in ("ct", "lung", "label", "cond", "hrmask")}
    save_nifti(out_dir / paths["ct"], ct_c.astype(np.float32), aff)
    save_nifti(out_dir / paths["lung"], lung_c.astype(np.uint8), aff)
    save_nifti(out_dir / paths["label"], label_c, aff)
    save_nifti(out_dir / paths["cond"], cond, aff)
    save_nifti(out_dir / paths["hrmask"], hr, aff)
    if twin is not None:
        paths["healthy"] = f"volumes/{key}_healthy.nii.gz"
        save_nifti(out_dir / paths["healthy"], crop_pad(resample_ct(twin, s)[0], start, size, fill=-1000.0), aff)
    vols.mkdir(exist_ok=True)
    t_vol = time.perf_counter()

    # Views from the native-resolution HU.
    def lung_fn(i: np.ndarray, j: np.ndarray, z: np.ndarray) -> np.ndarray:
        d, h, w = grid.from_native(i, j, z)
        return ndimage.map_coordinates(lung.astype(np.uint8), np.stack([d, h, w]).reshape(3, -1), order=0,
                                       cval=0).reshape(np.shape(i))

    for row in nod_rows:
        nod = row.pop("_nodule")
        nid = row["nodule_id"]
        sv = slice_view(ct, nod, db_zs, lung_fn, int(dc.size_2d))
        row["spacing_2d_mm"] = round(float(sv["spacing_mm"]), 4)
        save_npz(out_dir / "views" / "slices" / f"{nid}.npz", **sv)
        save_npz(out_dir / "views" / "rois" / f"{nid}.npz", image=roi_view(ct, nod, int(dc.roi_size)))
        crop = crop_view(ct, nod, db_zs, int(dc.crop_size), nod.scores["texture"])
        if twin is not None:  # the same cube of the healthy twin: where chapter 05 regenerates this nodule
            crop["healthy"] = crop_view(twin, nod, db_zs, int(dc.crop_size), nod.scores["texture"])["ct"]
        save_npz(out_dir / "views" / "crops" / f"{nid}.npz", **crop)
    t_end = time.perf_counter()
    scan_row = {
        "scan_id": key, "patient_id": scan.patient_id, "pylidc_scan_id": int(scan.id), **paths,
        "spacing_mm": s, "shape": ",".join(str(x) for x in size), "n_nodules": len(nod_rows),
        "source": ct.source, "n_slices": len(ct.zs), "pixel_spacing_mm": ct.pixel_spacing,
        "slice_spacing_mm": round(float(np.median(np.diff(ct.zs))) if len(ct.zs) > 1 else 0.0, 4),
        "contrast_used": bool(scan.contrast_used), "lung_mask_method": method,
        "crop_start": ",".join(str(int(x)) for x in start), "nodule_voxels": n_vox,
        "nodule_in_lung_fraction": round(in_lung, 4), "notes": "; ".join(ct.notes + qa_notes),
    }
    return {"status": "done", "scan": scan_row, "nodules": nod_rows,
            "skipped": [{"scan_id": key, "what": sk.split(":")[0], "reason": sk} for sk in skipped],
            "seconds": {"read": round(t_read - t0, 3), "volumes": round(t_vol - t_read, 3),
                        "views": round(t_end - t_vol, 3), "total": round(t_end - t0, 3)},
            "config": prepare_settings(cfg)}


# --------------------------------------------------------------------------- many scans


def scans_under_root(dicom_root: Path) -> list[Any]:
    """pylidc scans of every patient folder under ``dicom_root`` (sorted by scan id)."""
    from lungsynth.data.lidc import pylidc, query

    if not Path(dicom_root).is_dir():
        raise FileNotFoundError(f"DICOM root {dicom_root} does not exist; pass --dicom-root to an LIDC-IDRI "
                                "download (or run `lungsynth data phantom` first)")
    patients = sorted(p.name for p in Path(dicom_root).iterdir() if p.is_dir() and p.name.startswith("LIDC-IDRI-"))
    if not patients:
        raise FileNotFoundError(f"no LIDC-IDRI-XXXX patient folders under {dicom_root}")
    Scan = pylidc.Scan
    return query(Scan).filter(Scan.patient_id.in_(patients)).order_by(Scan.id).all()


def prepare_settings(cfg: Any) -> dict[str, Any]:
    """What a prepared scan depends on besides its DICOM (stored in its record as ``config``)."""
    dc = cfg.data
    return {"version": PREPARE_VERSION, "spacing_3d_mm": float(dc.spacing_3d_mm), "size_3d": int(dc.size_3d),
            "slice_view": "whole", "size_2d": dc.size_2d, "roi_size": dc.roi_size,
            "crop_size": dc.crop_size}


def _record_ok(out_dir: Path, rec: dict[str, Any], cfg: Any) -> bool:
    if rec.get("status") != "done":
        return False
    if rec.get("config") != prepare_settings(cfg):
        return False
    return all((out_dir / rec["scan"][k]).is_file() for k in ("ct", "lung", "label", "cond", "hrmask"))


def _prepare_one(job: dict[str, Any]) -> dict[str, Any]:
    """One scan of :func:`prepare` (run in a data worker): its record, ``skipped`` when it has no DICOM."""
    from lungsynth.data.lidc import get_scan, use_dicom_root

    with use_dicom_root(job["dicom_root"]):
        scan = get_scan(job["scan"])
        try:
            return prepare_scan(scan, Path(job["out_dir"]), job["cfg"], job["lung_method"])
        except FileNotFoundError as exc:
            return {"status": "skipped", "scan": {"scan_id": job["scan"], "patient_id": scan.patient_id},
                    "reason": str(exc)}


def prepare(dicom_root: Path | str, out_dir: Path | str, cfg: Any, scans: Sequence[str | int] | None = None,
            force: bool = False, lung_method: str = "classical", verbose: bool = True,
            workers: int | None = None) -> Path:
    """Prepare every scan with DICOM under ``dicom_root`` (or ``scans``) into ``out_dir``.

    Resumable: scans whose record exists with the same settings are skipped (``force`` redoes
    them), and each scan's record is written as it finishes. A scan without DICOM is recorded as skipped with
    the reason. ``workers`` processes prepare scans side by side (None: one per core,
    :func:`lungsynth.runtime.data_workers`); a scan's outputs never depend on the worker. Writes the manifest
    (scans.csv, nodules.csv, skipped.csv, splits.json) at the end. Returns ``out_dir``.
    """
    from lungsynth.data.lidc import get_scan, scan_key, use_dicom_root
    from lungsynth.data.manifest import read_record, write_manifest
    from lungsynth.runtime import data_workers, map_in_processes, write_json_atomic

    dicom_root, out_dir = Path(dicom_root).resolve(), Path(out_dir).resolve()
    if out_dir == dicom_root or dicom_root in out_dir.parents:
        raise ValueError(f"--out {out_dir} is inside the DICOM root {dicom_root}; source data is read-only, "
                         "choose an output folder elsewhere")
    with use_dicom_root(dicom_root):
        todo = scans_under_root(dicom_root) if scans is None else [get_scan(s) for s in scans]
    (out_dir / "records").mkdir(parents=True, exist_ok=True)
    jobs = []
    for scan in todo:
        key = scan_key(scan)
        rec_path = out_dir / "records" / f"{key}.json"
        old = read_record(rec_path) if rec_path.is_file() else None
        if force or old is None or not _record_ok(out_dir, old, cfg):
            jobs.append({"scan": key, "dicom_root": str(dicom_root), "out_dir": str(out_dir), "cfg": cfg,
                         "lung_method": lung_method})
    for job, rec in zip(jobs, map_in_processes(_prepare_one, jobs, data_workers(workers))):
        write_json_atomic(out_dir / "records" / f"{job['scan']}.json", rec)
        if verbose:
            msg = (f"{rec['scan']['n_nodules']} nodules, {rec['seconds']['total']} s" if rec["status"] == "done"
                   else f"skipped: {rec['reason']}")
            print(f"prepare {job['scan']}: {msg}", flush=True)
    write_manifest(out_dir, cfg)
    return out_dir
