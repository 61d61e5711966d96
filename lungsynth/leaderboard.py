"""The leaderboard (chapter 09): every trained method on the same held-out real reference, one table.

For each method in :data:`lungsynth.sampling.registry.METHODS` that has a trained run (or, with
``train_missing``, after training it), :func:`evaluate_method`:

1. samples :func:`sample_count` items (``cfg.evaluation.n_samples`` / ``n_samples_2d``, the papers' counts in
   ``full``) with conditions from the real **validation** split (:data:`BOARD_CONDITIONS`; ``lungsynth synth``;
   resumable, so a second evaluation reuses them), timing each sample. No generator trained on those scans, and
   none of them is in the test reference the samples are scored against: a method is never scored against the
   scans it was conditioned on (LAND's masks) or inpainted into (HR-LDM's backgrounds, Lung-DDPM's anatomy
   outside the lung), which would flatter it (:func:`refuse_reference_overlap` checks every row);
2. loads the real reference in the method's unit (test split: volumes, slices, ROIs or crops; a real
   reference of another size is resampled to the synthetic one) and the training split. The held-out items are
   cut in two fixed halves: the reference half every row is compared with, and a comparison half that makes the
   **baseline rows** (:func:`baseline_evaluations`: real vs real, blurred real, shuffled-pixel noise, and the
   reconstructions of the chapter 02 autoencoder a latent method decodes through), so a reader sees where each
   method falls between the floor and the noise;
3. computes FID / KID / MMD with half-sampling intervals on features of a named network (3D: ``cfg.evaluation
   .feature_network``; 2D: a slice net trained on the real training images by rotation prediction),
   MS-SSIM diversity (synthetic and real), masked MSE in the lung against the paired real volume
   (volume methods: the scan whose masks conditioned the sample; a paired measure, reported apart from the
   distribution metrics), HU-histogram JSD of nodule voxels by
   subtype, Dice of the generated nodule against the condition mask, the memorisation audit's flag rate
   (feature space and voxel space), the classifier two-sample test (held-out accuracy of telling the synthetic
   features from the real ones, :mod:`lungsynth.eval.two_sample`; 0.5 = indistinguishable), time per sample and
   peak memory.

Methods of different units are compared on their own unit's reference (a 2D FID is not a 3D FID:
the ``network`` column says which). A volume method whose samples hold generated nodules (LAND, HR-LDM, Lung-DDPM)
has a second row, unit ``nodule``: crops around its generated nodules only (an inpainting method's scan is otherwise
real) against crops around the real held-out nodules, both cut at 1 mm from volumes of the same grid
(:func:`nodule_crop_evaluation`; the level HR-LDM's paper evaluates, where every method that makes nodules is
comparable). Every reference is written once to ``runs/<profile>/reference/<unit>/<id>/``
(:func:`write_reference`: its case list, preprocessing, feature network, and the features with their mean and
covariance) and every row carries its ``reference`` id, so a number can be traced to the cases and network it was
computed against. :func:`write_leaderboard` writes ``runs/<profile>/leaderboard.{md,csv,json}``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lungsynth.data import fingerprint
from lungsynth.eval.features import hu_to_unit_range, unit_features

SUBTYPE_NAMES = ("solid", "part-solid", "ground-glass")
BOARD_CONDITIONS = "validation"  # the condition source of every row: held out from training, disjoint from the test
COLUMNS = ("method", "variant", "unit", "source", "n_synthetic", "n_real", "network", "reference", "fid", "fid_ci",
           "kid", "kid_ci",
           "mmd", "mmd_ci", "c2st", "c2st_ci", "ms_ssim", "ms_ssim_real", "masked_mse", "jsd_solid", "jsd_part-solid",
           "jsd_ground-glass", "dice", "memorization_flag_rate", "memorization_p", "memorization_flag_rate_voxel",
           "s_per_sample", "peak_memory_mb", "feature_dim")
UNIT_ORDER = ("volume", "nodule", "crop", "slice", "roi")
NODULE_UNIT = "nodule"  # crops around the generated nodules of a volume method (eval.nodule_crops)


def ranked(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The board's order: by unit, then by KID (the unbiased ranking metric), baselines among the methods so a
    reader sees which fall between the floor and the noise; rows without a KID last in their unit."""
    def key(r: dict[str, Any]) -> tuple:
        kid = r.get("kid")
        missing = kid is None or not np.isfinite(float(kid))
        unit = UNIT_ORDER.index(r["unit"]) if r["unit"] in UNIT_ORDER else len(UNIT_ORDER)
        return unit, missing, 0.0 if missing else float(kid)
    return sorted(rows, key=key)


@dataclass
class MethodEvaluation:
    """One method's row plus what the figures need."""

    row: dict[str, Any]
    synthetic: np.ndarray  # [N, ...] HU images as generated
    train: np.ndarray  # [M, ...] real training images (HU, resampled to the synthetic size)
    reference: np.ndarray  # [K, ...] real test images
    memorization: Any  # MemorizationResult (feature space)
    memorization_voxel: Any
    details: dict[str, Any] = field(default_factory=dict)
    features: np.ndarray | None = None  # [N, D] of ``synthetic`` in the row's network
    reference_features: np.ndarray | None = None  # [K, D] of the reference half (shared by the rows of a unit)
    nodule_crops: "MethodEvaluation | None" = None  # the same samples on crops around their generated nodules


# --------------------------------------------------------------------------- loading


def _image_key(unit: str) -> str:
    return "ct" if unit in ("volume", "crop") else "image"


def _mask_key(unit: str) -> str | None:
    return {"volume": "label", "crop": "mask", "slice": "mask"}.get(unit)


def _resize(arrs: np.ndarray, shape: Sequence[int], kind: str) -> np.ndarray:
    """[N, ...spatial] -> [N, *shape] (trilinear/bilinear for images, max-pool / nearest for masks)."""
    import torch
    import torch.nn.functional as F

    if tuple(arrs.shape[1:]) == tuple(shape):
        return arrs
    t = torch.from_numpy(np.ascontiguousarray(arrs, dtype=np.float32))[:, None]
    dims = len(shape)
    if kind == "image":
        out = F.interpolate(t, size=tuple(shape), mode="trilinear" if dims == 3 else "bilinear", align_corners=False)
    elif shape[0] < arrs.shape[1]:
        out = (F.adaptive_max_pool3d if dims == 3 else F.adaptive_max_pool2d)(t, tuple(shape))
    else:
        out = F.interpolate(t, size=tuple(shape), mode="nearest")
    return out[:, 0].numpy()


def load_real(root: Path, unit: str, split: str) -> dict[str, Any]:
    """Real ``split`` items of ``unit``: ``{"image" [N, ...] HU, "mask" [N, ...] | None, "lung" | None,
    "subtype" [N], "ids"}``."""
    from lungsynth.data.conditions import load_arrays, view_rows

    rows = view_rows(Path(root), unit, split)
    if len(rows) < 2:
        raise ValueError(f"the {split!r} split of {root} has {len(rows)} {unit} item(s); the leaderboard needs at "
                         f"least 2 (prepare more scans: cfg.data.n_scans)")
    arrays = [load_arrays(Path(root), unit, r) for r in rows]
    packed = _pack(arrays, unit, [_subtype_of_row(r, root, unit) for r in rows], [str(r.get("nodule_id", r["scan_id"]))
                                                                              for r in rows])
    packed["spacing_mm"] = [float(r["spacing_mm"]) if r.get("spacing_mm") not in (None, "") else None for r in rows]
    packed["scans"] = [str(r["scan_id"]) for r in rows]
    return packed


FOV_TOLERANCE = 0.05  # a synthetic volume's field of view may differ from the reference's by 5% at most


def check_matches_reference(syn: dict[str, Any], unit: str, real: dict[str, Any], out: Path | str) -> None:
    """Refuse a synthetic dataset that is not comparable with the real reference, naming both: another unit, or
    (volumes) another field of view, shape x spacing (the reference is resampled to the synthetic shape, so its
    spacing is scaled by the shape ratio before comparing). ``real``: ``{"shape", "spacing_mm"}`` of the held-out
    items as prepared."""
    if syn.get("unit") != unit:
        raise ValueError(f"{out} holds {syn.get('unit')!r} items but the method's unit, and so its reference, is "
                         f"{unit!r}; sample it again with `lungsynth synth` for this method")
    if unit != "volume":
        return
    syn_sp = {float(r["scan"]["spacing_mm"]) for r in syn.get("records", []) if r.get("scan")}
    real_sp = {v for v in real.get("spacing_mm", []) if v is not None}
    if not syn_sp or not real_sp:
        return
    syn_fov = max(syn_sp) * syn["image"].shape[1]
    real_fov = max(real_sp) * real["shape"][0]
    if abs(syn_fov - real_fov) > FOV_TOLERANCE * real_fov:
        raise ValueError(f"{out}: synthetic volumes of {syn['image'].shape[1]} voxels at {max(syn_sp):g} mm "
                         f"({syn_fov:.0f} mm across) do not match the real reference's {real['shape'][0]} "
                         f"voxels at {max(real_sp):g} mm ({real_fov:.0f} mm); resample one to the other's field of "
                         f"view first")


def _subtype_of_row(row: dict[str, Any], root: Path, unit: str) -> int:
    if unit != "volume":
        return int(row.get("subtype_id", 0))
    from lungsynth.data.datasets import load_nodules

    nod = load_nodules(root)
    sub = nod[nod["scan_id"] == row["scan_id"]]["subtype_id"]
    return int(sub.iloc[0]) if len(sub) else -1


def _pack(arrays: list[dict[str, np.ndarray]], unit: str, subtypes: list[int], ids: list[str]) -> dict[str, Any]:
    key, mkey = _image_key(unit), _mask_key(unit)
    out = {"image": np.stack([np.asarray(a[key], np.float32) for a in arrays]), "subtype": np.array(subtypes),
           "ids": ids, "mask": None, "lung": None}
    if mkey and all(mkey in a for a in arrays):
        out["mask"] = np.stack([(np.asarray(a[mkey]) > 0).astype(np.float32) for a in arrays])
    if all("lung" in a for a in arrays):
        out["lung"] = np.stack([(np.asarray(a["lung"]) > 0).astype(np.float32) for a in arrays])
    return out


def load_synthetic(out: Path) -> dict[str, Any]:
    """A synthetic dataset's images, masks, subtypes and provenance records (in sample order)."""
    from lungsynth.data.conditions import load_arrays
    from lungsynth.sampling.writer import SyntheticWriter

    meta = json.loads((Path(out) / "synth.json").read_text())
    recs = sorted(SyntheticWriter(out, meta["unit"]).records(), key=lambda r: r["index"])
    if not recs:
        raise ValueError(f"{out} holds no finished synthetic samples")
    unit = meta["unit"]
    arrays = []
    for r in recs:
        row = dict(r["scan"]) if unit == "volume" else {"nodule_id": r["sample_id"]}
        arrays.append(load_arrays(Path(out), unit, row))
    subs = [int(r["nodules"][0].get("subtype_id", -1)) if r["nodules"] else -1 for r in recs]
    packed = _pack(arrays, unit, subs, [r["sample_id"] for r in recs])
    packed["records"] = recs
    packed["unit"] = unit
    return packed


# --------------------------------------------------------------------------- features


def train_slice_net(cfg: Any, train_hu: np.ndarray):
    """The 2D feature net of the slice/ROI leaderboard rows, trained on real training images."""
    from lungsynth.eval.features import train_slice_net as fit

    return fit(hu_to_unit_range(train_hu, cfg), int(cfg.evaluation.slice_net_steps), batch_size=16,
               seed=cfg.seed, progress=False)


# --------------------------------------------------------------------------- one method


def _ci(m: Any) -> str:
    """"[low, high]", "insufficient N" (too few samples per set for an interval) or "" (none asked for)."""
    interval = m.interval()
    if isinstance(interval, tuple):
        return f"[{interval[0]:.4g}, {interval[1]:.4g}]"
    return "insufficient N" if interval else ""


def _jsd_by_subtype(syn: dict[str, Any], real: dict[str, Any]) -> dict[str, float | None]:
    from lungsynth.eval.fidelity import hu_histogram_jsd

    out: dict[str, float | None] = {}
    for sid, name in enumerate(SUBTYPE_NAMES):
        s_sel, r_sel = syn["subtype"] == sid, real["subtype"] == sid
        if syn["mask"] is None or real["mask"] is None or not s_sel.any() or not r_sel.any():
            out[f"jsd_{name}"] = None
            continue
        sv = syn["image"][s_sel][syn["mask"][s_sel] > 0.5]
        rv = real["image"][r_sel][real["mask"][r_sel] > 0.5]
        out[f"jsd_{name}"] = hu_histogram_jsd(sv, rv) if sv.size and rv.size else None
    return out


def _paired_mse(cfg: Any, syn: dict[str, Any], root: Path) -> float | None:
    """Masked MSE in the lung (course [0, 1] scale) against the real scan whose masks conditioned each sample."""
    from lungsynth.data.datasets import load_scans
    from lungsynth.eval.fidelity import masked_mse
    from lungsynth.data.conditions import load_arrays

    if syn["unit"] != "volume" or syn["lung"] is None:
        return None
    scans = load_scans(root).set_index("scan_id")
    real = []
    for r in syn["records"]:
        sid = r.get("condition_scan_id")
        if not sid or sid not in scans.index:
            return None
        real.append(load_arrays(root, "volume", {**scans.loc[sid].to_dict(), "scan_id": sid})["ct"])
    real_hu = _resize(np.stack(real).astype(np.float32), syn["image"].shape[1:], "image")
    mse = masked_mse(hu_to_unit_range(syn["image"], cfg)[:, None], hu_to_unit_range(real_hu, cfg)[:, None],
                     syn["lung"][:, None])
    return float(mse.mean())


MIN_HALF = 2  # the baselines need two held-out halves of at least this many items each


def _subset(d: dict[str, Any], idx: np.ndarray) -> dict[str, Any]:
    """The items ``idx`` of a :func:`load_real`-shaped dict."""
    out = dict(d)
    for k in ("image", "mask", "lung", "subtype"):
        if d.get(k) is not None:
            out[k] = d[k][idx]
    out["ids"] = [d["ids"][i] for i in idx]
    if d.get("scans") is not None:
        out["scans"] = [d["scans"][i] for i in idx]
    if d.get("spacing_mm") is not None:
        out["spacing_mm"] = [d["spacing_mm"][i] for i in idx]
    return out


def real_reference(cfg: Any, root: Path, unit: str, shape: Sequence[int],
                   cache: dict[tuple, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The fixed real reference of ``unit`` at ``shape``, computed once per (data, unit, shape) when ``cache`` is
    given (every method of the unit reads the same one).

    The held-out (test) items are resized to ``shape`` and cut in two halves (``eval.baselines.halves``, the seed of
    the config): ``real``, the reference half every row is compared with, and ``comparison``, from which the baseline
    rows are made (None below ``2 * MIN_HALF`` items: then ``real`` is the whole test set and the board has no
    baselines). Returns ``{"real", "comparison", "train", "diversity" (MS-SSIM of the reference), "net" (the 2D
    slice net of slice/ROI units, trained once on the real training items; None for 3D), "network", "features"
    [N, D] of the reference, "id"}``.
    """
    from lungsynth.eval.baselines import halves

    key = (str(root), unit, tuple(int(v) for v in shape))
    if cache is not None and key in cache:
        return cache[key]
    test, train = load_real(root, unit, "test"), load_real(root, unit, "train")
    # the held-out items' own size and spacing, before resizing: what the field-of-view check compares
    native = {"shape": tuple(int(v) for v in test["image"].shape[1:]), "spacing_mm": test["spacing_mm"]}
    for d in (test, train):
        d["image"] = _resize(d["image"], shape, "image")
        for k in ("mask", "lung"):
            if d[k] is not None:
                d[k] = _resize(d[k], shape, "mask")
    if len(test["image"]) >= 2 * MIN_HALF:
        a, r = halves(len(test["image"]), int(cfg.seed))
        real, comparison = _subset(test, r), _subset(test, a)
    else:
        real, comparison = test, None
    net = train_slice_net(cfg, train["image"]) if unit in ("slice", "roi") else None
    ref = _reference(cfg, root, unit, real, comparison, train, net)
    ref["native"] = native
    if cache is not None:
        cache[key] = ref
    return ref


def _reference(cfg: Any, root: Path | str, unit: str, real: dict[str, Any], comparison: dict[str, Any] | None,
               train: dict[str, Any], net: Any = None, preprocessing: str | None = None) -> dict[str, Any]:
    """A reference dict (see :func:`real_reference`) from its three item sets: features, id and diversity."""
    from lungsynth.eval.fidelity import ms_ssim_diversity

    features, network = unit_features(cfg, unit, real["image"], net)
    return {"unit": unit, "root": Path(root), "real": real, "comparison": comparison, "train": train, "net": net,
            "network": network, "features": features,
            "id": write_reference(cfg, root, unit, real, features, network, preprocessing),
            "diversity": ms_ssim_diversity(hu_to_unit_range(real["image"], cfg)[:, None], seed=cfg.seed)}


def nodule_reference(cfg: Any, volume_ref: dict[str, Any], size: int,
                     cache: dict[tuple, dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """The real reference of the nodule-crop rows: ``size``^3 crops at 1 mm around every real nodule of the volume
    reference's items, cut from the held-out (and training) volumes *as resized to the synthetic grid*, so real and
    synthetic crops come from volumes of one spacing (:mod:`lungsynth.eval.nodule_crops`). The volume reference's
    halves give the crop halves (split by scan, so one patient's nodules stay on one side). None when the reference
    half holds fewer than 2 nodules."""
    from lungsynth.data.datasets import load_nodules
    from lungsynth.eval.nodule_crops import cut_nodule_crops, real_centres

    root = volume_ref["root"]
    shape = tuple(int(v) for v in volume_ref["real"]["image"].shape[1:])
    key = (str(root), NODULE_UNIT, shape, int(size))
    if cache is not None and key in cache:
        return cache[key]
    native = volume_ref["native"]
    scale = [s / n for s, n in zip(shape, native["shape"])]
    spacing = max(v for v in native["spacing_mm"] if v is not None) / scale[0]
    nodules = load_nodules(Path(root))

    def crops(items: dict[str, Any] | None) -> dict[str, Any] | None:
        if items is None:
            return None
        return cut_nodule_crops(items["image"], items["mask"], real_centres(nodules, items["ids"], scale), spacing,
                                size)

    real, comparison, train = (crops(volume_ref[k]) for k in ("real", "comparison", "train"))
    if len(real["image"]) < 2:
        return None
    if comparison is not None and len(comparison["image"]) < MIN_HALF:
        comparison = None
    prep = (f"{size}^3 crops at 1 mm around each real nodule, cut from the held-out volumes resampled to the synthetic "
            f"volumes' grid ({shape[0]} voxels at {spacing:.3g} mm); HU clipped to [{float(cfg.data.hu_min):g}, "
            f"{float(cfg.data.hu_max):g}], scaled to [0, 1]")
    ref = _reference(cfg, root, NODULE_UNIT, real, comparison, train, preprocessing=prep)
    ref["native"] = {"shape": shape, "spacing_mm": [spacing] * len(real["image"])}
    if cache is not None:
        cache[key] = ref
    return ref


def write_reference(cfg: Any, root: Path | str, unit: str, real: dict[str, Any], features: np.ndarray,
                    network: str, preprocessing: str | None = None) -> str:
    """Record the real reference of one unit and return its id (``<unit>-<10 hex>``).

    The id is a digest of what defines the reference: the prepared data's fingerprint, the unit, the item shape, the
    held-out case list (``real["ids"]``), the HU window and the feature network's name. The folder
    ``runs/<profile>/reference/<unit>/<id>/`` holds ``reference.json`` (those fields, N and the feature dimension),
    ``features.npy`` [N, D] and ``stats.npz`` (mean [D], covariance [D, D]); it is written once, and a second method of
    the same unit finds it in place (its files are not rewritten).
    """
    import hashlib

    from lungsynth import paths
    from lungsynth.eval.features import describe_network
    from lungsynth.runtime import write_json_atomic

    feats = np.asarray(features, dtype=np.float64)
    payload = {"data": fingerprint.load(root)["id"], "source": fingerprint.source_label(root), "unit": unit,
               "split": "test", "shape": [int(v) for v in real["image"].shape[1:]],
               "cases": [str(i) for i in real["ids"]],
               "preprocessing": preprocessing or f"HU clipped to [{float(cfg.data.hu_min):g}, "
                                                 f"{float(cfg.data.hu_max):g}], scaled to [0, 1], resampled to the "
                                                 f"synthetic items' shape",
               "network": describe_network(network)}
    ref_id = f"{unit}-" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]
    folder = paths.runs_dir(cfg.profile) / "reference" / unit / ref_id
    record = folder / "reference.json"
    if record.is_file():
        return ref_id
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "features.npy", feats)
    cov = np.cov(feats, rowvar=False) if len(feats) > 1 else np.zeros((feats.shape[1], feats.shape[1]))
    np.savez(folder / "stats.npz", mean=feats.mean(axis=0), cov=cov)
    write_json_atomic(record, {"id": ref_id, **payload, "n": int(len(feats)), "dim": int(feats.shape[1])})
    return ref_id


def refuse_reference_overlap(syn: dict[str, Any], ref: dict[str, Any], out: Path | str) -> None:
    """ValueError when a synthetic item was conditioned on (or inpainted into) a scan of the real reference it is
    about to be scored against, or of the comparison half the baselines are made from."""
    conditioned = {str(r.get("condition_scan_id")) for r in syn["records"] if r.get("condition_scan_id")}
    for part in ("real", "comparison"):
        items = ref.get(part)
        shared = sorted(conditioned & set(items.get("scans") or ())) if items else []
        if shared:
            raise ValueError(f"{out}: {len(shared)} synthetic item(s) were conditioned on scans of the {part} "
                             f"reference they would be scored against ({', '.join(shared[:4])}); sample the board "
                             f"with conditions={BOARD_CONDITIONS!r} into a fresh folder")


def sample_count(cfg: Any, adapter: Any, root: Path | str) -> int:
    """How many items the board samples of a method: ``cfg.evaluation.n_samples`` (volumes, crops) or
    ``n_samples_2d`` (slices, ROIs); where that is 0 (``full``), the method's paper's count
    (``MethodFace.paper_samples``), or one per case of the board's condition split when the paper evaluates on its
    held-out set."""
    from lungsynth.data.conditions import SOURCE_SPLITS, view_rows

    e = cfg.evaluation
    n = int(e.n_samples_2d if adapter.unit in ("slice", "roi") else e.n_samples)
    if n > 0:
        return n
    if adapter.paper_samples:
        return int(adapter.paper_samples)
    return len(view_rows(Path(root), adapter.unit, SOURCE_SPLITS[BOARD_CONDITIONS]))


def evaluate_method(cfg: Any, method: Any, *, n: int | None = None, real_root: Path | str | None = None,
                    train_missing: bool = False, out: Path | str | None = None, progress: bool = False,
                    checkpoint: Path | str | None = None,
                    references: dict[tuple, dict[str, Any]] | None = None) -> MethodEvaluation:
    """Sample ``method`` on held-out conditions and compute its leaderboard row (see the module docstring);
    ``references`` (a dict :func:`real_reference` fills) shares the real sets between methods. A volume method whose
    samples hold generated nodules also gets its nodule-crop row (``.nodule_crops``, :func:`nodule_crop_evaluation`)."""
    from lungsynth.data.conditions import real_root as find_root
    from lungsynth.sampling.registry import get_method
    from lungsynth.methods.base import MethodFace
    from lungsynth.sampling.synth import synthesize

    adapter = method if isinstance(method, MethodFace) else get_method(method)
    root = find_root(cfg, real_root)
    n = int(n or sample_count(cfg, adapter, root))
    res = synthesize(cfg, adapter, n, conditions=BOARD_CONDITIONS, out=out, checkpoint=checkpoint,
                     train_missing=train_missing, real_root=root, progress=progress)
    # the generator never saw a test patient (its run's data stamp says whom it trained on)
    fingerprint.refuse_overlap(res.out, root, ("test",), what=f"{adapter.name} generator of {res.out}")
    syn = load_synthetic(res.out)
    unit = adapter.unit
    ref = real_reference(cfg, root, unit, syn["image"].shape[1:], references)
    check_matches_reference(syn, unit, ref["native"], res.out)
    refuse_reference_overlap(syn, ref, res.out)
    scored = _score(cfg, unit, syn, ref)
    row = {"method": adapter.name, "variant": adapter.variant, **scored.row,
           "masked_mse": _paired_mse(cfg, syn, root), "s_per_sample": res.seconds_per_sample,
           "peak_memory_mb": res.peak_memory_mb}
    details = {"data": fingerprint.read_stamp(res.out),  # fingerprint, source, the generator's training patients
               **scored.details, "synthetic_dir": str(res.out), "checkpoint": syn["records"][0].get("checkpoint")}
    scored.row, scored.details = row, details
    if unit == "volume":
        scored.nodule_crops = nodule_crop_evaluation(cfg, adapter, syn, ref, references)
    return scored


def _score(cfg: Any, unit: str, syn: dict[str, Any], ref: dict[str, Any]) -> MethodEvaluation:
    """The metrics of one item set ``syn`` (:func:`load_synthetic`-shaped) against a reference
    (:func:`real_reference`): distribution, two-sample test, memorisation, diversity, nodule JSD and Dice."""
    from lungsynth.eval.distribution import evaluate_distribution
    from lungsynth.eval.fidelity import ms_ssim_diversity, nodule_dice
    from lungsynth.eval.memorization import audit
    from lungsynth.eval.two_sample import classifier_two_sample_test

    real, train, net, f_real = ref["real"], ref["train"], ref["net"], ref["features"]
    f_syn, name = unit_features(cfg, unit, syn["image"], net)
    f_train, _ = unit_features(cfg, unit, train["image"], net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # small-N warnings: the row carries its n and CIs
        dist = evaluate_distribution(f_real, f_syn, cfg, network=name, seed=cfg.seed)
        c2st = classifier_two_sample_test(f_real, f_syn, seed=cfg.seed, network=name)
        mem = audit(f_syn, f_train, f_real, network=name, percentile=cfg.evaluation.memorization_percentile)
        unit_syn, unit_train, unit_real = (hu_to_unit_range(a["image"], cfg) for a in (syn, train, real))
        mem_vox = audit(unit_syn, unit_train, unit_real,
                        space="voxel", percentile=cfg.evaluation.memorization_percentile)
    div = ms_ssim_diversity(hu_to_unit_range(syn["image"], cfg)[:, None], seed=cfg.seed)
    div_real = ref["diversity"]
    dice = None
    if syn["mask"] is not None and all((m > 0.5).any() for m in syn["mask"]):
        dice = float(nodule_dice(syn["image"][:, None], syn["mask"][:, None], cfg.evaluation.dice_threshold_hu).mean())
    row = {"unit": unit, "source": fingerprint.source_label(ref["root"]), "n_synthetic": len(syn["image"]),
           "n_real": len(real["image"]), "network": name, "reference": ref["id"], "feature_dim": int(f_real.shape[1]),
           "fid": dist["fid"].value, "fid_ci": _ci(dist["fid"]), "kid": dist["kid"].value, "kid_ci": _ci(dist["kid"]),
           "mmd": dist["mmd"].value, "mmd_ci": _ci(dist["mmd"]), "c2st": c2st.value, "c2st_ci": _ci(c2st),
           "ms_ssim": div["mean"], "ms_ssim_real": div_real["mean"], **_jsd_by_subtype(syn, real), "dice": dice,
           "memorization_flag_rate": mem.flag_rate, "memorization_p": mem.p_value,
           "memorization_flag_rate_voxel": mem_vox.flag_rate}
    details = {"distribution": {k: v.as_dict() for k, v in dist.items()}, "two_sample": c2st.as_dict(),
               "memorization": mem.summary(), "memorization_voxel": mem_vox.summary(), "ms_ssim": div,
               "ms_ssim_real": div_real}
    return MethodEvaluation(row, syn["image"], train["image"], real["image"], mem, mem_vox, details, f_syn, f_real)


def nodule_crop_evaluation(cfg: Any, adapter: Any, syn: dict[str, Any], volume_ref: dict[str, Any],
                           references: dict[tuple, dict[str, Any]] | None = None) -> MethodEvaluation | None:
    """The row of a volume method on crops around its *generated* nodules (``cfg.data.crop_size``^3 at 1 mm,
    :mod:`lungsynth.eval.nodule_crops`) against the real held-out nodules cut the same way from volumes of the same
    grid (:func:`nodule_reference`): the level HR-LDM's paper evaluates, where an inpainting method is comparable
    with a whole-volume one. None when fewer than 2 generated or real nodules exist."""
    from lungsynth.eval.nodule_crops import cut_nodule_crops, generated_centres

    centres = generated_centres(syn["records"])
    if sum(len(c) for c in centres) < 2:
        return None
    size = int(cfg.data.crop_size)
    ref = nodule_reference(cfg, volume_ref, size, references)
    if ref is None:
        return None
    spacing = float(syn["records"][0]["scan"]["spacing_mm"])
    crops = cut_nodule_crops(syn["image"], syn["mask"], centres, spacing, size)
    scored = _score(cfg, NODULE_UNIT, crops, ref)
    scored.row = {"method": adapter.name, "variant": adapter.variant, **scored.row, "masked_mse": None,
                  "s_per_sample": None, "peak_memory_mb": None}
    scored.details = {**scored.details, "crops_of": "generated nodules", "crop_size": size,
                      "synthetic_spacing_mm": spacing, "real_spacing_mm": ref["native"]["spacing_mm"][0]}
    return scored


# --------------------------------------------------------------------------- baselines

BLUR_SIGMA_VOXELS = 2.0  # "blurred real": anatomy kept, fine texture lost
WHOLE_ITEM_UNITS = ("roi", "crop", "nodule")  # items inside the body: their shuffled baseline permutes every voxel


def baseline_sets(cfg: Any, unit: str, images: np.ndarray) -> dict[str, np.ndarray]:
    """The three baselines made from real held-out items [N, *S] (HU): as they are (``real vs real``, what a perfect
    generator scores), Gaussian-blurred by :data:`BLUR_SIGMA_VOXELS` (``blurred real``), and with their voxels
    permuted inside the body (``shuffled-pixel noise``: the HU histogram without anatomy)."""
    from scipy import ndimage

    from lungsynth.autoencoders.evaluate import body_mask
    from lungsynth.eval.baselines import shuffle_in_body

    bodies = (np.ones_like(images, dtype=bool) if unit in WHOLE_ITEM_UNITS
              else np.stack([body_mask(x) for x in images]))
    return {"real vs real": images,
            "blurred real": np.stack([ndimage.gaussian_filter(x, BLUR_SIGMA_VOXELS) for x in images]),
            "shuffled-pixel noise": shuffle_in_body(images, bodies, int(cfg.seed))}


def baseline_evaluations(cfg: Any, ref: dict[str, Any],
                         autoencoders: Sequence[str] = ()) -> dict[str, MethodEvaluation]:
    """The board's baseline rows for one reference (:func:`real_reference`): each of :func:`baseline_sets` of the
    comparison half, compared with the reference half exactly as a method's samples are (FID, KID, MMD, the
    two-sample classifier, MS-SSIM), and, for each chapter 02 autoencoder kind in ``autoencoders`` (those the unit's
    latent methods decode through), its reconstructions of the comparison half (:func:`autoencoder_ceiling`). A
    working method's row falls between ``real vs real`` and the noise; a latent one at best near its autoencoder's
    row. Empty when the held-out set was too small to halve."""
    comp = ref["comparison"]
    if comp is None:
        return {}
    unit, out = ref["unit"], {}
    sets = baseline_sets(cfg, unit, comp["image"])
    for kind in dict.fromkeys(k for k in autoencoders if k):
        recon = autoencoder_ceiling(cfg, kind, comp["image"], ref["root"])
        if recon is not None:
            sets[f"{kind} reconstructions (autoencoder ceiling)"] = recon
    for name, images in sets.items():
        out[f"baseline {unit}: {name}"] = _baseline_row(cfg, ref, name, images)
    return out


def _baseline_row(cfg: Any, ref: dict[str, Any], name: str, images: np.ndarray) -> MethodEvaluation:
    """One baseline set of HU items compared with the reference half as a method's samples are."""
    from lungsynth.eval.distribution import evaluate_distribution
    from lungsynth.eval.fidelity import ms_ssim_diversity
    from lungsynth.eval.two_sample import classifier_two_sample_test

    unit, comp = ref["unit"], ref["comparison"]
    feats, network = unit_features(cfg, unit, images, ref["net"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # small N: the row carries its n and CIs
        dist = evaluate_distribution(ref["features"], feats, cfg, network=network, seed=cfg.seed)
        c2st = classifier_two_sample_test(ref["features"], feats, seed=cfg.seed, network=network)
    div = ms_ssim_diversity(hu_to_unit_range(images, cfg)[:, None], seed=cfg.seed)
    row = {**dict.fromkeys(COLUMNS), "method": f"baseline: {name}", "variant": "", "unit": unit,
           "source": fingerprint.source_label(ref["root"]), "n_synthetic": len(images),
           "n_real": len(ref["real"]["image"]), "network": network, "reference": ref["id"],
           "feature_dim": int(feats.shape[1]),
           "fid": dist["fid"].value, "fid_ci": _ci(dist["fid"]), "kid": dist["kid"].value,
           "kid_ci": _ci(dist["kid"]), "mmd": dist["mmd"].value, "mmd_ci": _ci(dist["mmd"]), "c2st": c2st.value,
           "c2st_ci": _ci(c2st), "ms_ssim": div["mean"], "ms_ssim_real": ref["diversity"]["mean"]}
    details = {"baseline": name, "items": comp["ids"], "distribution": {k: v.as_dict() for k, v in dist.items()},
               "two_sample": c2st.as_dict()}
    return MethodEvaluation(row, images, ref["train"]["image"], ref["real"]["image"], None, None, details, feats,
                            ref["features"])


def autoencoder_ceiling(cfg: Any, kind: str, images_hu: np.ndarray, root: Path | str,
                        batch_size: int = 4) -> np.ndarray | None:
    """Chapter 02's ``kind`` autoencoder's reconstructions of real items [N, *S] (HU in, HU out; through the
    course's HU window and back): what a latent method decoded by it can at best produce. None, with a printed
    reason, when no finished and current autoencoder of ``kind`` is in place (the board never trains one)."""
    import torch

    from lungsynth.autoencoders import trained_autoencoder

    ae = trained_autoencoder(kind, cfg, root=root)
    if ae is None:
        print(f"leaderboard: no autoencoder ceiling row for {kind}: no finished run of it on the current data "
              f"(train it in chapter 02: `lungsynth autoencoder train --kind {kind} --profile {cfg.profile}`)")
        return None
    # the window the autoencoder was trained in: the slice view's (bbox_ldm.hu_clip) for the VQ-VAE, else the data's
    lo, hi = (tuple(float(v) for v in cfg.bbox_ldm.hu_clip) if kind == "vqvae2d"
              else (float(cfg.data.hu_min), float(cfg.data.hu_max)))
    dev = next(ae.parameters()).device
    x = torch.from_numpy(((np.clip(images_hu, lo, hi) - lo) / (hi - lo)).astype(np.float32))[:, None]
    out = [ae.reconstruct(x[i:i + batch_size].to(dev), int(cfg.autoencoders.sliding_roi)).float().cpu()
           for i in range(0, len(x), batch_size)]
    return (torch.cat(out)[:, 0].clamp(0, 1).numpy() * (hi - lo) + lo).astype(np.float32)


def real_vs_real_curve(reference: np.ndarray, comparison: np.ndarray, sizes: Sequence[int], *, repeats: int = 20,
                       seed: int = 0) -> list[dict[str, Any]]:
    """What FID and KID say about real against real at N samples: for each n in ``sizes``, ``repeats`` draws of n
    rows of ``comparison`` [A, D] (without replacement) against the whole ``reference`` [R, D].

    Rows ``{"n", "fid_mean", "fid_sd", "kid_mean", "kid_sd"}``: a perfect generator's FID at small n is far above 0
    and falls with n (FID is biased), its KID scatters around 0 (unbiased) with a spread that shrinks, which is why
    the board ranks by KID and prints N beside every number. Sizes above A are skipped."""
    from lungsynth.eval.distribution import fid_value, kid

    rng = np.random.default_rng(seed)
    rows = []
    for n in sorted({int(v) for v in sizes if 2 <= int(v) <= len(comparison)}):
        fids, kids = [], []
        for _ in range(int(repeats)):
            pick = comparison[rng.choice(len(comparison), n, replace=False)]
            fids.append(fid_value(reference, pick))
            kids.append(kid(reference, pick, subset_size=max(len(reference), n), min_samples_warn=0).value)
        rows.append({"n": n, "fid_mean": float(np.mean(fids)), "fid_sd": float(np.std(fids)),
                     "kid_mean": float(np.mean(kids)), "kid_sd": float(np.std(kids))})
    return rows


def feature_map(results: dict[str, MethodEvaluation], unit: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Every row of ``unit`` and its reference half in one 2D picture of the feature space: metric MDS
    (scikit-learn) of the standardised features of all sets together. Returns ``{name: [N, 2]}`` with the reference
    under ``"reference"``; a set that lies on the reference's cloud is hard to tell from real."""
    from sklearn.manifold import MDS

    chosen = {k: e for k, e in results.items() if e.row["unit"] == unit and e.features is not None}
    if not chosen:
        raise ValueError(f"no row of unit {unit!r} with features on this board")
    sets = {"reference": next(iter(chosen.values())).reference_features, **{k: e.features for k, e in chosen.items()}}
    stacked = np.concatenate(list(sets.values()))
    stacked = (stacked - stacked.mean(0)) / (stacked.std(0) + 1e-8)
    xy = MDS(n_components=2, init="classical_mds", random_state=seed, normalized_stress="auto").fit_transform(stacked)
    out, start = {}, 0
    for name, f in sets.items():
        out[name] = xy[start:start + len(f)]
        start += len(f)
    return out


# --------------------------------------------------------------------------- all methods


def build_leaderboard(cfg: Any, methods: Sequence[str] | None = None, *, n: int | None = None,
                      train_missing: bool = False, real_root: Path | str | None = None,
                      progress: bool = False, baselines: bool = True) -> dict[str, MethodEvaluation]:
    """Evaluate every trained method (or ``methods``); untrained ones are skipped unless ``train_missing``.

    Returns ``{name: MethodEvaluation}`` in registry order, a volume method that makes nodules followed by its
    nodule-crop row (key ``<name> (nodule crops)``), then (``baselines``) the baseline rows of every
    reference the methods were compared with (:func:`baseline_evaluations`, keys ``baseline <unit>: <name>``);
    ``{}`` when no method is trained.
    """
    from lungsynth.sampling.registry import METHODS, available_methods, get_method

    names = list(methods) if methods else available_methods()
    out: dict[str, MethodEvaluation] = {}
    references: dict[tuple, dict[str, Any]] = {}  # real sets shared by the methods of one unit and size
    decoders: dict[str, list[str]] = {}  # reference id -> the autoencoder kinds its methods decode through
    for name in names:
        adapter = get_method(name) if name in METHODS else None
        if adapter is None:
            raise ValueError(f"unknown method {name!r}; registered: {', '.join(METHODS)}")
        if not train_missing and not adapter.is_trained(cfg):
            if progress:
                print(f"leaderboard: skipping {name} (no trained run at {adapter.run_dir(cfg)}; use --train-missing)")
            continue
        t0 = time.perf_counter()
        out[name] = evaluate_method(cfg, adapter, n=n, real_root=real_root, train_missing=train_missing,
                                    progress=progress, references=references)
        out[name].details["evaluation_seconds"] = round(time.perf_counter() - t0, 2)
        decoders.setdefault(out[name].row["reference"], []).append(adapter.autoencoder_kind(cfg))
        if out[name].nodule_crops is not None:
            out[f"{name} (nodule crops)"] = out[name].nodule_crops
    if baselines:
        for ref in references.values():
            out.update(baseline_evaluations(cfg, ref, decoders.get(ref["id"], ())))
    return out


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def leaderboard_markdown(rows: Sequence[dict[str, Any]], profile: str = "") -> str:
    """The table as GitHub markdown (one row per method; ``-`` where a metric does not apply)."""
    head = ["method", "unit", "n syn/real", "network", "reference", "FID [95% CI]", "KID [95% CI]", "MMD^2 (biased)",
            "real vs synthetic classifier [95% CI]", "MS-SSIM syn (real)",
            "masked MSE", "JSD solid / part-solid / GGO", "Dice", "memorised (feat / voxel)", "s/sample", "peak MB"]
    sources = sorted({str(r.get("source", "unknown source")) for r in rows})
    label = ", ".join(([profile] if profile else []) + sources)
    lines = [f"# Leaderboard{f' ({label})' if label else ''}", "",
             "Every method sampled on conditions from the validation scans (never trained on, none of them in the "
             "reference) and compared with the same real test set of its unit, so no row is scored against the "
             "scans it was conditioned on or inpainted into; masked MSE is the paired measure against the "
             "condition's own scan. Volume methods that make nodules appear again as unit *nodule*, crops around their "
             "generated nodules against crops around the real held-out nodules cut from volumes of the same grid. "
             "Lower is better for FID/KID/MMD^2, masked MSE, JSD and memorised; MS-SSIM near the real "
             "value is best (higher = less diverse). The classifier column is the held-out accuracy of a "
             "classifier telling synthetic from real features (0.5 = indistinguishable, 1 = told apart; '-' when "
             "a set has fewer than 10 samples). A reference id names the real cases and feature network a row is "
             "compared with (`runs/<profile>/reference/<unit>/<id>/reference.json`). Rows named *baseline* are the "
             "other half of the held-out items compared with the same reference: as they are (the floor a perfect "
             "generator reaches), blurred, with their voxels shuffled inside the body (the noise), and, for a latent "
             "method, reconstructed by the chapter 02 autoencoder it decodes through (its ceiling); a working "
             "method falls between the floor and the noise. Rows are ranked by KID within each unit. † marks an FID "
             "or MMD from fewer samples than the feature dimension: biased upward and unstable, read KID.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in ranked(rows):
        dim = r.get("feature_dim")
        few = "†" if dim and min(int(r["n_synthetic"]), int(r["n_real"])) < int(dim) else ""
        name = r["method"] + (f" ({r['variant']})" if r.get("variant") else "")
        name = f"*{name}*" if name.startswith("baseline:") else name
        lines.append("| " + " | ".join([
            name, r["unit"], f"{r['n_synthetic']}/{r['n_real']}", str(r["network"]), _fmt(r.get("reference")),
            f"{_fmt(r['fid'])}{few} {r['fid_ci']}", f"{_fmt(r['kid'])} {r['kid_ci']}", _fmt(r["mmd"]) + few,
            f"{_fmt(r.get('c2st'))} {r.get('c2st_ci', '')}".strip(),
            f"{_fmt(r['ms_ssim'])} ({_fmt(r['ms_ssim_real'])})", _fmt(r["masked_mse"]),
            " / ".join(_fmt(r[f"jsd_{s}"]) for s in SUBTYPE_NAMES), _fmt(r["dice"]),
            f"{_fmt(r['memorization_flag_rate'])} / {_fmt(r['memorization_flag_rate_voxel'])}",
            _fmt(r["s_per_sample"]), _fmt(r["peak_memory_mb"])]) + " |")
    if not rows:
        lines.append("| (no trained method found: train one in chapters 03-07 or run `lungsynth evaluate "
                     "--train-missing`) |" + " |" * (len(head) - 1))
    return "\n".join(lines) + "\n"


def write_leaderboard(results: dict[str, MethodEvaluation] | Sequence[dict[str, Any]], out_dir: Path | str,
                      profile: str = "") -> dict[str, Path]:
    """Write ``leaderboard.md``, ``.csv`` and ``.json`` (rows + details) into ``out_dir`` atomically."""
    import os

    import pandas as pd

    from lungsynth.runtime import write_json_atomic

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(results, dict):
        rows = [e.row for e in results.values()]
        details = {k: e.details for k, e in results.items()}
    else:
        rows, details = list(results), {}
    paths = {"md": out_dir / "leaderboard.md", "csv": out_dir / "leaderboard.csv", "json": out_dir / "leaderboard.json"}
    tmp = paths["md"].with_name(".tmp_leaderboard.md")
    tmp.write_text(leaderboard_markdown(rows, profile))
    os.replace(tmp, paths["md"])
    tmp = paths["csv"].with_name(".tmp_leaderboard.csv")
    pd.DataFrame(rows, columns=list(COLUMNS)).to_csv(tmp, index=False)
    os.replace(tmp, paths["csv"])
    write_json_atomic(paths["json"], {"profile": profile, "rows": rows, "details": details})
    return paths


# --------------------------------------------------------------------------- CLI


def register(sub: argparse._SubParsersAction) -> None:
    """``lungsynth evaluate --profile P [--methods ...] [--train-missing]``."""
    from lungsynth.config import add_profile_argument

    p = sub.add_parser("evaluate", help="chapter 09: the leaderboard of every trained method")
    p.add_argument("--methods", nargs="*", default=None, help="default: every method with a trained run")
    p.add_argument("--n", type=int, default=None,
                   help="synthetic samples per method (default: cfg.evaluation.n_samples; n_samples_2d for 2D units)")
    p.add_argument("--train-missing", action="store_true", help="train methods that have no trained run first")
    p.add_argument("--out", default=None, help="folder of leaderboard.{md,csv,json} (default runs/<profile>)")
    add_profile_argument(p)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from lungsynth import paths
    from lungsynth.config import get_config, parse_overrides

    cfg = get_config(args.profile, parse_overrides(args.overrides))
    results = build_leaderboard(cfg, args.methods, n=args.n, train_missing=args.train_missing, progress=True)
    files = write_leaderboard(results, args.out or paths.runs_dir(cfg.profile), cfg.profile)
    print(files["md"].read_text())
    print(f"written: {', '.join(str(p) for p in files.values())}")
    return 0
