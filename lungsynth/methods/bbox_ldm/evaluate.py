"""The chapter's own tables (chapter 04): Table 2 of Mari et al. in shape, and where the inference boxes fall.

- **Table 2** (Mari et al. §3.1): for every real ``split`` slice each configuration (1: mask concat,
  2: + mask cross-attention, 3: + attribute cross-attention) generates a slice with that slice's box and
  attributes; ``FID = ||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2))`` (Heusel et al. 2017) is
  computed on whole slices and on 32 x 32 crops centred on the boxes (:data:`CROP`), in the 2D features
  of the evaluation chapter (:func:`feature_net`, :func:`fid_2d`) instead of Inception's.
- **Box placement** (Mari et al. §3.2, the paper's failure cases): the tissue under each box in a real
  slice (:func:`classify_boxes`: lung, lung border, soft tissue, bone, outside the body, from the lung
  mask and the HU) and the inside-lung rate of the paper's and the anatomical sampler
  (:func:`box_placement`, :func:`compare_samplers`).
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage

from lungsynth.data import fingerprint
from lungsynth.data.datasets import data_source, prepared_root
from lungsynth.methods.bbox_ldm.model import CONFIG_NAMES, CONFIGS
from lungsynth.methods.bbox_ldm.sample import BboxLdm, MaskDraw, anatomical_sampler, load, paper_sampler, to_hu
from lungsynth.methods.bbox_ldm.train import ensure_trained, load_split

TISSUES: tuple[str, ...] = ("lung", "lung border", "soft tissue", "bone", "outside body")
BONE_HU = 250.0  # median HU under the box at or above this: bone (cortical and trabecular)
BODY_HU = -500.0  # the body is the filled region above this HU
CROP = 32  # the paper's nodule-crop side for the local FID


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


def box_placement(cfg, draw: MaskDraw, seed: int = 0) -> dict[str, Any]:
    """Where the boxes of ``draw`` fall in real training slices.

    An anatomical box is judged in the slice it was placed in; a paper box (no slice of its own) in a
    training slice drawn at random. Returns ``{"labels", "slice_index", "inside_lung_rate", "counts"}``.
    """
    data = load_split(cfg, "train")
    rng = np.random.default_rng(seed)
    idx = np.where(draw.slice_index >= 0, draw.slice_index, rng.integers(len(data["lungs"]), size=len(draw)))
    hu = to_hu(data["images"][idx, 0], data["hu_clip"])
    labels = classify_boxes(draw.boxes, hu, data["lungs"][idx])
    return {"labels": labels, "slice_index": idx, "inside_lung_rate": inside_lung_rate(labels),
            "counts": tissue_counts(labels)}


def compare_samplers(cfg, n: int = 200, seed: int = 0) -> dict[str, Any]:
    """Both samplers side by side: ``{"draws": {name: MaskDraw}, "placement": {name: box_placement(...)},
    "centre_map": the paper's [H, W] centre probability, "rates": {name: inside-lung rate}}``."""
    paper = paper_sampler(cfg)
    draws = {"paper": paper.sample(int(n), seed), "anatomical": anatomical_sampler(cfg).sample(int(n), seed)}
    placement = {name: box_placement(cfg, d, seed) for name, d in draws.items()}
    return {"draws": draws, "placement": placement, "centre_map": paper.centre_map,
            "rates": {name: p["inside_lung_rate"] for name, p in placement.items()}}


# --------------------------------------------------------------------------- Table 2


def crops(images: torch.Tensor, boxes: np.ndarray, size: int = CROP) -> torch.Tensor:
    """size x size crops centred on each box (shifted to stay inside the image): [N, 1, size, size]."""
    h, w = images.shape[-2:]
    size = min(size, h, w)
    out = []
    for img, (y0, x0, s) in zip(images, np.asarray(boxes)):
        cy, cx = y0 + s // 2, x0 + s // 2
        top = int(np.clip(cy - size // 2, 0, h - size))
        left = int(np.clip(cx - size // 2, 0, w - size))
        out.append(img[:, top:top + size, left:left + size])
    return torch.stack(out)


def feature_net(cfg, seed: int = 0):
    """The evaluation chapter's 2D slice network, trained (rotation prediction, ``cfg.evaluation.slice_net_steps``)
    on the real training slices of this chapter's HU window."""
    from lungsynth.eval.features import train_slice_net

    return train_slice_net(load_split(cfg, "train")["images"], steps=int(cfg.evaluation.slice_net_steps), seed=seed,
                           progress=False)


def fid_2d(real: torch.Tensor, fake: torch.Tensor, net, hu_clip: Sequence[float], bootstrap: int = 0,
           seed: int = 0) -> dict[str, Any]:
    """FID between two sets of [N, 1, H, W] slices (or crops) in the evaluation chapter's 2D features.

    Returns ``{"fid", "ci_low", "ci_high", "network"}`` (the interval only with ``bootstrap`` > 0).
    """
    import warnings

    from lungsynth.eval.distribution import fid
    from lungsynth.eval.features import slice_features

    kw = dict(net=net, intensity="hu", unit_range=tuple(hu_clip))
    fr, name = slice_features(to_hu(real, hu_clip), **kw)
    ff, _ = slice_features(to_hu(fake, hu_clip), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # small-N warning: the table reports N beside each FID
        res = fid(fr, ff, bootstrap=int(bootstrap), seed=seed, network=name)
    return {"fid": float(res.value), "ci_low": res.ci_low, "ci_high": res.ci_high, "network": name}


def evaluate(cfg, configs: Sequence[int] = CONFIGS, *, split: str = "val", repeats: int = 1, seed: int = 0,
             steps: int | None = None, models: Mapping[int, BboxLdm] | None = None, net=None) -> dict[str, Any]:
    """The chapter's Table 2 in shape, plus where the two samplers put their boxes.

    Each configuration generates ``repeats`` slices per real ``split`` slice, conditioned on that slice's
    box and attributes; FID is computed on whole slices and on 32 x 32 crops around the boxes.

    Returns ``{"table": [{"config", "conditioning", "fid_slice", "fid_crop", "n_real", "n_fake",
    "network", "seconds"}], "samples": {config: [N, 1, H, W]}, "real": {...}, "placement": {...}}``.
    """
    real = load_split(cfg, split)
    net = net if net is not None else feature_net(cfg, seed)
    boxes = np.repeat(real["boxes"], repeats, axis=0)
    attrs = np.repeat(real["attributes"], repeats, axis=0)
    rows, samples = [], {}
    for k in configs:
        if models is not None and k in models:
            model = models[k]
        else:
            run_dir = ensure_trained(cfg, k)
            fingerprint.refuse_overlap(run_dir, prepared_root(cfg), (split,), what=f"bbox-LDM config {k} run")
            model = load(cfg, k, run_dir)
        t0 = time.perf_counter()
        fake = model.sample(boxes, attrs, seed=seed, steps=steps)
        seconds = time.perf_counter() - t0
        nb = int(cfg.evaluation.bootstrap)
        whole = fid_2d(real["images"], fake, net, real["hu_clip"], nb, seed)
        local = fid_2d(crops(real["images"], real["boxes"]), crops(fake, boxes), net, real["hu_clip"], nb, seed)
        samples[k] = fake
        rows.append({"config": k, "conditioning": CONFIG_NAMES[k], "fid_slice": whole["fid"],
                     "fid_slice_ci": (whole["ci_low"], whole["ci_high"]), "fid_crop": local["fid"],
                     "fid_crop_ci": (local["ci_low"], local["ci_high"]), "n_real": len(real["images"]),
                     "n_fake": len(fake),
                     "network": whole["network"], "seconds": round(seconds, 2)})
    source = data_source(cfg)  # every table says which data its numbers come from
    rows = [{**r, "source": source} for r in rows]
    placement = compare_samplers(cfg, 200, seed)["placement"]
    return {"table": rows, "samples": samples, "real": real, "boxes": boxes, "attributes": attrs,
            "placement": {s: {"inside_lung_rate": p["inside_lung_rate"], "counts": p["counts"]}
                          for s, p in placement.items()}}
