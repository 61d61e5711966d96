"""The chapter's own tables (chapter 04): Table 2 of Mari et al. in shape, where the inference boxes fall, and the
quality gates on generated slices.

- **Table 2** (Mari et al. §3.1): for every real ``split`` slice each configuration (1: mask concat,
  2: + mask cross-attention, 3: + attribute cross-attention) generates a slice with a box and attributes
  drawn by the paper's inference sampler; ``FID = ||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2))`` (Heusel et al. 2017) is
  computed on whole slices and on 32 x 32 crops centred on the boxes (:data:`CROP`), in the 2D features
  of the evaluation chapter (:func:`feature_net`, :func:`fid_2d`) instead of Inception's.
- **Box placement** (Mari et al. §3.2, the paper's failure cases): the tissue under each box in a real
  slice (:func:`classify_boxes`: lung, lung border, soft tissue, bone, outside the body, from the lung
  mask and the HU) and the inside-lung rate of the paper's and the anatomical sampler
  (:func:`box_placement`, :func:`compare_samplers`). For the anatomical sampler that real slice is the one
  whose lung placed the box, so its rate is 1 by construction.
- **Quality gates** (:func:`quality_gates`): the same questions asked of **generated** slices. The tissue under
  a box is read from the generated slice's own classical lung mask (:func:`box_tissues`); the nodule's contrast
  in its box against a ring around it, against real boxes of the same side (:func:`box_contrast`,
  :func:`reference_contrast`); texture order over a sweep (:func:`texture_sweep`); KID of whole slices and
  nodule crops against the shuffled-pixel baseline of ``lungsynth.eval.baselines``.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage

from lungsynth.data import fingerprint
from lungsynth.data.datasets import data_source, prepared_root
from lungsynth.gates import Gate, info, judge
from lungsynth.methods.bbox_ldm.model import ATTRIBUTES, CONFIG_NAMES, CONFIGS, LUNG_CONFIG
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
    """FID and KID between two sets of [N, 1, H, W] slices (or crops) in the evaluation chapter's 2D features.

    Returns ``{"fid", "fid_ci", "kid", "kid_ci", "network"}``: an interval is (low, high), "insufficient N: ..."
    below 8 items a set, or None without ``bootstrap`` (KID is unbiased at small N, so it is the one to read at the
    course's sizes).
    """
    import warnings

    from lungsynth.eval.distribution import fid, kid
    from lungsynth.eval.features import slice_features, slice_net_name

    kw = dict(net=net, intensity="hu", unit_range=tuple(hu_clip))
    fr, name = slice_features(to_hu(real, hu_clip), **kw)
    ff, _ = slice_features(to_hu(fake, hu_clip), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # small-N warning: the table reports N beside each FID
        res = fid(fr, ff, bootstrap=int(bootstrap), seed=seed, network=name)
        k = kid(fr, ff, subset_size=max(len(fr), len(ff)), bootstrap=int(bootstrap), seed=seed, network=name,
                min_samples_warn=0)
    return {"fid": float(res.value), "fid_ci": res.interval(), "kid": float(k.value), "kid_ci": k.interval(5),
            "network": name}


def evaluate(cfg, configs: Sequence[int] = CONFIGS, *, split: str = "val", repeats: int = 1, seed: int = 0,
             steps: int | None = None, models: Mapping[int, BboxLdm] | None = None, net=None,
             extra: Mapping[str, BboxLdm] | None = None) -> dict[str, Any]:
    """The chapter's Table 2 in shape, plus where the two samplers put their boxes.

    Each configuration generates ``cfg.bbox_ldm.table2_samples`` slices (the paper's 2048 in ``full``; 0: ``repeats``
    per real ``split`` slice), in batches, conditioned on boxes and attributes drawn by the paper's inference sampler
    (Mari §3.2; the same draws and seed for every configuration), never on the real slices' own boxes; FID and KID
    (bootstrap intervals) are computed on whole slices and on 32 x 32 crops around the boxes (the real crops around
    the real boxes). ``extra`` adds rows for other trained runs under their own names (chapter 04: configuration 2
    with pooled mask tokens), sampled on the same draws.

    Returns ``{"table": [{"config", "conditioning", "fid_slice", "fid_crop", "kid_slice", "kid_crop" (each with
    its "_ci"), "n_real", "n_fake", "network", "seconds", "source"}], "samples": {config: [N, 1, H, W]}, "boxes",
    "attributes" (the draws), "real": {...}, "placement": {...}}``.
    """
    real = load_split(cfg, split)
    net = net if net is not None else feature_net(cfg, seed)
    n = int(cfg.bbox_ldm.table2_samples) or len(real["images"]) * int(repeats)
    draw = paper_sampler(cfg).sample(n, seed)
    runs: dict[Any, tuple[str, BboxLdm]] = {}
    for k in configs:
        if models is not None and k in models:
            model = models[k]
        else:
            run_dir = ensure_trained(cfg, k)
            fingerprint.refuse_overlap(run_dir, prepared_root(cfg), (split,), what=f"bbox-LDM config {k} run")
            model = load(cfg, k, run_dir)
        runs[k] = (CONFIG_NAMES[k], model)
    for name, model in (extra or {}).items():
        runs[name] = (f"{CONFIG_NAMES[model.config_id]} ({model.cfg.bbox_ldm.mask_context} mask context)", model)
    rows, samples = [], {}
    nb = int(cfg.evaluation.bootstrap)
    for key, (conditioning, model) in runs.items():
        t0 = time.perf_counter()
        fake = model.sample(draw.boxes, draw.attributes, seed=seed, steps=steps)
        seconds = time.perf_counter() - t0
        whole = fid_2d(real["images"], fake, net, real["hu_clip"], nb, seed)
        local = fid_2d(crops(real["images"], real["boxes"]), crops(fake, draw.boxes), net, real["hu_clip"], nb, seed)
        samples[key] = fake
        rows.append({"config": key, "conditioning": conditioning, "fid_slice": whole["fid"],
                     "fid_slice_ci": whole["fid_ci"], "fid_crop": local["fid"],
                     "fid_crop_ci": local["fid_ci"], "kid_slice": whole["kid"],
                     "kid_slice_ci": whole["kid_ci"], "kid_crop": local["kid"], "kid_crop_ci": local["kid_ci"],
                     "n_real": len(real["images"]), "n_fake": len(fake), "network": whole["network"],
                     "seconds": round(seconds, 2), "source": data_source(cfg)})  # every table names its data
    placement = compare_samplers(cfg, 200, seed)["placement"]
    return {"table": rows, "samples": samples, "real": real, "boxes": draw.boxes, "attributes": draw.attributes,
            "placement": {s: {"inside_lung_rate": p["inside_lung_rate"], "counts": p["counts"]}
                          for s, p in placement.items()}}


# --------------------------------------------------------------------------- quality gates (course profile)

CHAPTER = "04"
GATES_FILE = "04_bbox_ldm_gates.json"
# 2: the feature network named in the KID rows; 3: real textures are the readers' medians; 4: the flattened mask,
# the pooled-token run and gate 1's ceiling rows
GATES_VERSION = 4
# Gate 1: a generated nodule keeps at least half the inside-minus-ring contrast of real boxes of its size, in
# at least 80% of samples: the issue's thresholds, as the 3D methods' nodule gates (eval.nodules)
MIN_BOX_CONTRAST_RATIO = 0.5
MIN_BOX_SHARE = 0.8
# Gate 2: the paper's failure mode (a box in muscle, bone or outside the body) in at most 5% of the slices the
# anatomical sampler conditions; the lung is segmented on the generated slice itself
MIN_IN_LUNG = 0.95
MIN_TEXTURE_SPEARMAN = 0.6  # gate 3 (config 3): requested texture against the nodule's mean HU
MAX_KID_SHARE = 0.1  # gate 4: KID at most a tenth of the shuffled-pixel baseline's, as every method's
MIN_SAMPLES = 16  # fewer generated slices than this judge nothing
SWEEP_BOXES = 8  # boxes of the texture sweep (the largest the sampler drew), each at textures 1..5
IN_LUNG = ("lung", "lung border")  # a box on the pleura (a juxtapleural nodule) is not the failure mode
# the runs the gates judge, as (configuration, lung, mask context): the paper's three configurations (the flattened
# mask), configuration 2 with the course's pooled mask tokens beside it, and the course's lung-conditioned variant
VARIANTS: tuple[tuple[int, bool, str], ...] = (tuple((k, False, "flat") for k in CONFIGS)
                                               + ((2, False, "pooled"), (LUNG_CONFIG, True, "flat")))


def ring(box: Sequence[int], shape: tuple[int, int], width: int | None = None) -> np.ndarray:
    """The ring of ``width`` pixels (default: half the side, at least 2) around a box (y0, x0, side): bool [H, W]."""
    y0, x0, s = (int(v) for v in box)
    w = max(2, s // 2) if width is None else int(width)
    out = np.zeros(shape, dtype=bool)
    out[max(0, y0 - w):y0 + s + w, max(0, x0 - w):x0 + s + w] = True
    out[y0:y0 + s, x0:x0 + s] = False
    return out


def box_contrast(hu: np.ndarray, box: Sequence[int]) -> float:
    """Mean HU inside a box minus the mean HU of the ring around it (:func:`ring`), on one slice [H, W]."""
    y0, x0, s = (int(v) for v in box)
    return float(hu[y0:y0 + s, x0:x0 + s].mean() - hu[ring(box, hu.shape)].mean())


def reference_contrast(side: int, sides: np.ndarray, contrasts: np.ndarray, min_boxes: int = 3) -> float:
    """Median real contrast of boxes of the same side (widened by one pixel until ``min_boxes`` are found)."""
    for tol in range(0, int(sides.max()) + 1):
        near = np.abs(sides - int(side)) <= tol
        if near.sum() >= min_boxes:
            return float(np.median(contrasts[near]))
    return float(np.median(contrasts))


def box_tissues(hu: np.ndarray, boxes: np.ndarray, spacing_mm: float | Sequence[float]) -> list[str]:
    """Where each box falls in its own slice, the lung segmented on that slice: :func:`classify_box` with the
    classical 2D lung mask (:func:`lungsynth.data.masks.slice_lung_mask`); hu [n, H, W], boxes [n, 3], one pixel
    side for every slice or one per slice."""
    from lungsynth.data.masks import slice_lung_mask

    spacings = np.broadcast_to(np.asarray(spacing_mm, dtype=float), (len(hu),))
    return [classify_box(b, hu[i], slice_lung_mask(hu[i], float(spacings[i])))
            for i, b in enumerate(np.asarray(boxes))]


def in_lung_rate(labels: Sequence[str]) -> float:
    """Share of boxes that overlap the lung (:data:`IN_LUNG`): one minus the paper's failure rate."""
    return float(np.mean([lab in IN_LUNG for lab in labels])) if len(labels) else float("nan")


def _real_measures(cfg: Any, held: Mapping[str, Any]) -> dict[str, Any]:
    hu = to_hu(held["images"][:, 0], held["hu_clip"])
    boxes = np.asarray(held["boxes"])
    inside = [float(hu[i, y0:y0 + s, x0:x0 + s].mean()) for i, (y0, x0, s) in enumerate(boxes)]
    return {"hu": hu, "boxes": boxes, "sides": boxes[:, 2], "inside_hu": np.asarray(inside),
            "contrasts": np.asarray([box_contrast(hu[i], b) for i, b in enumerate(boxes)]),
            "tissues": box_tissues(hu, boxes, held["spacings"]),
            # the readers' median texture: a reader drawn at random would move the baseline from run to run
            "textures": np.asarray(held["attributes_median"])[:, list(ATTRIBUTES).index("texture")]}


def _baselines(hu: np.ndarray, boxes: np.ndarray, n: int, features: Any, seed: int, network: str) -> dict[str, Any]:
    """Floor and shuffled-pixel noise KIDs at ``n`` (eval.baselines) on whole slices and on nodule crops, in the
    features of ``network``."""
    from lungsynth.eval.baselines import unit_baselines

    bodies = np.stack([body_mask(h) for h in hu])
    crop_hu = crops(torch.from_numpy(hu[:, None]), boxes)[:, 0].numpy()
    crop_body = crops(torch.from_numpy(bodies[:, None]), boxes)[:, 0].numpy()
    return {"slice": unit_baselines("slice", hu, bodies, features, n, network=network, seed=seed),
            "crop": unit_baselines("nodule crop", crop_hu, crop_body, features, n, network=network, seed=seed)}


def texture_sweep(model: BboxLdm, draw: MaskDraw, n_boxes: int = SWEEP_BOXES, seed: int = 0,
                  lungs: np.ndarray | None = None) -> list[dict[str, Any]]:
    """The ``n_boxes`` largest boxes of ``draw`` (among those ``lungs`` [n, H, W] covers, for a lung-conditioned
    model), each generated at textures 1..5 (other scores and the noise kept): rows ``{"box", "texture",
    "inside_hu"}``, the mean HU inside the box."""
    count = len(draw) if lungs is None else len(lungs)
    order = np.argsort(-draw.boxes[:count, 2], kind="stable")[:n_boxes]
    t = list(ATTRIBUTES).index("texture")
    rows = []
    for j in order:
        attrs = np.repeat(draw.attributes[j][None], 5, axis=0)
        attrs[:, t] = np.arange(1, 6)
        boxes = np.repeat(draw.boxes[j][None], 5, axis=0)
        lung = None if lungs is None else np.repeat(lungs[j][None], 5, axis=0)
        hu = to_hu(model.sample(boxes, attrs, lungs=lung, seed=seed + int(j), same_noise=True)[:, 0],
                   model.cfg.bbox_ldm.hu_clip)
        y0, x0, s = (int(v) for v in draw.boxes[j])
        rows += [{"box": int(j), "texture": k + 1, "inside_hu": float(hu[k, y0:y0 + s, x0:x0 + s].mean())}
                 for k in range(5)]
    return rows


def variant_label(config: int, lung: bool = False, mask_context: str = "flat") -> str:
    """``bbox_ldm config<k>`` (``+ lung`` for the lung-conditioned variant, ``pooled tokens`` for the mask-token
    context): the name of a run in the gate rows."""
    return (f"bbox_ldm config{config}" + (" + lung" if lung else "")
            + (" (pooled tokens)" if mask_context == "pooled" and config > 1 else ""))


def variant_config(cfg: Any, mask_context: str) -> Any:
    """``cfg`` with ``bbox_ldm.mask_context`` set (a copy; ``cfg`` itself when it already has it)."""
    from lungsynth.config import apply_overrides

    if cfg.bbox_ldm.mask_context == mask_context:
        return cfg
    return apply_overrides(cfg, {"bbox_ldm.mask_context": mask_context})


def box_share(hu: np.ndarray, boxes: np.ndarray, real: Mapping[str, Any]) -> tuple[float, int]:
    """Gate 1's measure: the share of boxes whose contrast (:func:`box_contrast`) on slices ``hu`` [n, H, W] is at
    least :data:`MIN_BOX_CONTRAST_RATIO` x the real median of boxes of the same side; and how many boxes were judged
    (those whose real reference contrast is positive)."""
    ref = np.asarray([reference_contrast(s, real["sides"], real["contrasts"]) for s in np.asarray(boxes)[:, 2]])
    got = np.asarray([box_contrast(hu[i], b) for i, b in enumerate(np.asarray(boxes))])
    judged = ref > 0
    share = float(np.mean(got[judged] >= MIN_BOX_CONTRAST_RATIO * ref[judged])) if judged.any() else float("nan")
    return share, int(judged.sum())


def box_share_ceiling(held: Mapping[str, Any], real: Mapping[str, Any], ae: Any) -> dict[str, tuple[float, int]]:
    """What gate 1 can reach at best: its share on the real held-out slices with their own boxes, and on the frozen
    autoencoder's reconstructions of the same slices (a generator is decoded by it, so a nodule the autoencoder
    loses no sampler can draw)."""
    from lungsynth.methods.bbox_ldm.model import decode, encode

    recon = to_hu(decode(ae, encode(ae, held["images"]))[:, 0], held["hu_clip"])
    return {"real": box_share(real["hu"], real["boxes"], real), "autoencoder": box_share(recon, real["boxes"], real)}


def config_gates(cfg: Any, model: BboxLdm, draws: Mapping[str, MaskDraw], real: Mapping[str, Any],
                 base: Mapping[str, Any], features: Any, seed: int = 0) -> list[Gate]:
    """Every gate of one trained run on ``n`` slices per sampler (the baselines' n). A lung-conditioned model is
    given the lung of the real slice each anatomical box was placed in; the paper's sampler has no lung for it."""
    from lungsynth.eval.nodules import spearman

    k = model.config_id
    label = variant_label(k, model.lung, model.cfg.bbox_ldm.mask_context)
    n = base["slice"].n
    anat, paper = draws["anatomical"], draws["paper"]
    clip = cfg.bbox_ldm.hu_clip
    lungs = load_split(cfg, "train")["lungs"][anat.slice_index[:n]] if model.lung else None
    hu = to_hu(model.sample(anat.boxes[:n], anat.attributes[:n], lungs=lungs, seed=seed)[:, 0], clip)
    hu_paper = None if model.lung else to_hu(model.sample(paper.boxes[:n], paper.attributes[:n], seed=seed)[:, 0],
                                             clip)
    share, judged = box_share(hu, anat.boxes[:n], real)
    ceiling, _ = real["ceiling"]["autoencoder"]
    spacing = float(np.median(load_split(cfg, "train")["spacings"]))  # the pixel of the generated slices
    tissues = box_tissues(hu, anat.boxes[:n], spacing)
    tissues_paper = box_tissues(hu_paper, paper.boxes[:n], spacing) if hu_paper is not None else []
    counts = ", ".join(f"{t} {c}" for t, c in tissue_counts(tissues).items() if c)
    paper_rate = f"; the paper's sampler: {in_lung_rate(tissues_paper):.2f}" if tissues_paper else ""
    rows = [
        judge(CHAPTER, f"{label}: nodule in the box, share with >= {MIN_BOX_CONTRAST_RATIO:g} x real contrast", share,
              n=judged, n_needed=MIN_SAMPLES, at_least=MIN_BOX_SHARE, baseline=ceiling,
              baseline_name="the VQ-VAE's reconstructions of real held-out slices",
              detail=f"contrast = mean HU in the box - a ring of half its side; real median "
                     f"{np.median(real['contrasts']):.0f} HU (held-out boxes of the same side)"),
        judge(CHAPTER, f"{label}: box in the lung of the generated slice (anatomical sampler)", in_lung_rate(tissues),
              n=n, n_needed=MIN_SAMPLES, at_least=MIN_IN_LUNG, baseline=in_lung_rate(real["tissues"]),
              baseline_name="real held-out slices, own boxes",
              detail=f"{counts}{paper_rate}"),
    ]
    if tissues_paper:
        rows.append(info(CHAPTER, f"{label}: box in the lung of the generated slice (the paper's sampler)",
                         in_lung_rate(tissues_paper), n=n,
                         detail=", ".join(f"{t} {c}" for t, c in tissue_counts(tissues_paper).items() if c)))
    for unit, images in (("slice", hu), ("crop", crops(torch.from_numpy(hu[:, None]), anat.boxes[:n])[:, 0].numpy())):
        b = base[unit]
        rows.append(judge(CHAPTER, f"{label}: KID of {'whole slices' if unit == 'slice' else 'nodule crops'} vs "
                          f"held-out half", b.score(features(images)).value, n=n, n_needed=MIN_SAMPLES,
                          factor=MAX_KID_SHARE, baseline=b.noise.value, baseline_name="shuffled-pixel noise",
                          detail=f"real-vs-real floor {b.floor.value:.4g}; features {b.network}"))
    if k == 3:
        sweep = texture_sweep(model, anat, seed=seed, lungs=lungs)
        rho = spearman([r["texture"] for r in sweep], [r["inside_hu"] for r in sweep])
        rows.append(judge(CHAPTER, f"{label}: Spearman(texture, HU in the box), sweep", rho, n=len(sweep),
                          n_needed=10, at_least=MIN_TEXTURE_SPEARMAN,
                          baseline=spearman(real["textures"], real["inside_hu"]),
                          baseline_name="real held-out boxes",
                          detail=f"textures 1-5 in the {SWEEP_BOXES} largest sampled boxes, same noise"))
    return rows


def measure_gates(cfg: Any, models: Sequence[BboxLdm], *, n: int | None = None, seed: int = 0) -> list[Gate]:
    """The gates of every loaded run on this profile's held-out slices, each against baselines of the
    same n: the held-out set is cut in halves (eval.baselines), the conditions come from the samplers."""
    from lungsynth.eval.baselines import halves
    from lungsynth.eval.features import slice_features, slice_net_name

    held = load_split(cfg, "test")
    n = int(n or cfg.bbox_ldm.n_gate_samples)
    a, r = halves(len(held["images"]), seed)
    if len(a) < n or len(r) < 2:
        return [judge(CHAPTER, "bbox_ldm: held-out slices for the gates", len(held["images"]),
                      n=len(held["images"]), n_needed=2 * n, at_least=2 * n,
                      detail=f"halves of {len(a)} and {len(r)}; prepare more scans")]
    net = feature_net(cfg, seed)
    clip = held["hu_clip"]
    features = lambda x: slice_features(x, net=net, intensity="hu", unit_range=tuple(clip))[0]  # noqa: E731
    real = _real_measures(cfg, held)
    real["ceiling"] = box_share_ceiling(held, real, models[0].ae)
    base = _baselines(real["hu"], real["boxes"], n, features, seed, slice_net_name(net))
    draws = {"anatomical": anatomical_sampler(cfg).sample(n, seed), "paper": paper_sampler(cfg).sample(n, seed)}
    rows = [g for model in models for g in config_gates(cfg, model, draws, real, base, features, seed)]
    rows.append(info(CHAPTER, "bbox_ldm: real-vs-real KID floor, whole slices (held-out halves)",
                     base["slice"].floor.value, n=n, detail="what a perfect generator scores at this N"))
    for source, what in (("real", "real held-out slices, their own boxes"),
                         ("autoencoder", "the VQ-VAE's reconstructions of those slices")):
        share, judged = real["ceiling"][source]
        rows.append(info(CHAPTER, f"bbox_ldm: nodule in the box on {what}", share, n=judged,
                         detail=f"gate 1's measure (>= {MIN_BOX_CONTRAST_RATIO:g} x the median real contrast of the "
                                f"same side): what a generator decoded by this autoencoder can reach"))
    return rows


def quality_gates(cfg: Any) -> list[Gate]:
    """Chapter 04's gates on the profile's trained configurations (an untrained one is listed with its
    command); measured once per set of checkpoints and data, then read from ``runs/<profile>/04_bbox_ldm_gates.json``."""
    from lungsynth import paths
    from lungsynth.autoencoders.model import default_run_dir as ae_run_dir
    from lungsynth.engine import FINAL_NAME, load_checkpoint
    from lungsynth.gates import cached, file_digest, not_trained
    from lungsynth.methods.bbox_ldm.train import default_run_dir, rebuild_command, train_command

    rows: list[Gate] = []
    trained: dict[str, Any] = {}
    for k, lung, mask_context in VARIANTS:
        vcfg = variant_config(cfg, mask_context)
        run = default_run_dir(vcfg, k, create=False, lung=lung)
        label = variant_label(k, lung, mask_context)
        final = run / FINAL_NAME
        if not final.is_file() or int(load_checkpoint(final).get("step", 0)) < int(cfg.bbox_ldm.train_steps):
            rows.append(not_trained(CHAPTER, label, train_command(vcfg, k, lung)))
            continue
        try:
            fingerprint.refuse_overlap(run, prepared_root(cfg), ("test",), what=f"bbox-LDM {run.name}")
            model = load(vcfg, k, run, lung=lung)
        except (ValueError, FileNotFoundError) as exc:  # another architecture, data or overlapping patients
            rows.append(not_trained(CHAPTER, label,
                                    f"{rebuild_command(vcfg, k, lung)}  ({str(exc).splitlines()[0][:120]})"))
            continue
        trained[run.name] = (run, model)
    if not trained:
        return rows
    vq = ae_run_dir("vqvae2d", cfg, create=False) / FINAL_NAME
    key = {"gates": GATES_VERSION, "weights": {name: file_digest(run / FINAL_NAME) for name, (run, _) in trained.items()},
           "autoencoder": file_digest(vq) if vq.is_file() else None,
           "data": fingerprint.load(prepared_root(cfg))["id"], "n": int(cfg.bbox_ldm.n_gate_samples),
           "steps": int(cfg.bbox_ldm.ddim_steps), "slice_net_steps": int(cfg.evaluation.slice_net_steps)}
    return rows + cached(paths.runs_dir(cfg.profile) / GATES_FILE, key,
                         lambda: measure_gates(cfg, [m for _, m in trained.values()]))
