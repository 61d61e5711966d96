"""Reconstruction metrics and figures of the chapter 02 autoencoders.

- :func:`reconstruction_metrics`: MAE in HU over the whole volume, the body, the lungs and the
  nodules (overall and per LIDC texture class 1..5), PSNR and SSIM (MONAI, on the [0,1] scale).
- :func:`resample_baseline`: the no-learning reference at the same x4 compression (down- and
  up-sampling); an autoencoder worth its training beats it.
- :func:`evaluate_autoencoder` / :func:`nodule_errors`: tables over a split, per item and per
  nodule (size and texture), for the notebook's "what compression loses" section.
- :func:`plot_reconstructions`: input, reconstruction and error maps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lungsynth.autoencoders.model import LUNG_COND, TEXTURES
from lungsynth.autoencoders.train import item_id, source_dataset, source_key

def resample_baseline(x: torch.Tensor, factor: int = 4, down: str = "area") -> torch.Tensor:
    """Down-sample each side by ``factor`` and up-sample back with (tri|bi)linear interpolation.

    Args:
        x: [B,C,*S] with S divisible by ``factor``.
        down: "area" (box average, the stronger baseline) or "linear" (trilinear/bilinear
            sampling without prefiltering).
    Returns:
        [B,C,*S]: what survives keeping one value per factor^d voxels.
    """
    nd = x.ndim - 2
    mode = "trilinear" if nd == 3 else "bilinear"
    if down == "area":
        small = F.avg_pool3d(x, factor) if nd == 3 else F.avg_pool2d(x, factor)
    elif down == "linear":
        small = F.interpolate(x, scale_factor=1.0 / factor, mode=mode, align_corners=False)
    else:
        raise ValueError(f"down must be 'area' or 'linear', got {down!r}")
    return F.interpolate(small, size=tuple(x.shape[2:]), mode=mode, align_corners=False)


def body_mask(hu: np.ndarray, lung: np.ndarray | None = None, threshold: float = -500.0) -> np.ndarray:
    """Voxels inside the body: tissue above ``threshold`` HU, holes filled slice by slice
    (axis 0, axial: the airways leave the volume, so a 3D fill would not close the lungs)."""
    from scipy import ndimage

    tissue = hu > threshold
    filled = np.stack([ndimage.binary_fill_holes(s) for s in tissue]) if hu.ndim == 3 else \
        ndimage.binary_fill_holes(tissue)
    if lung is not None:
        filled |= lung > 0
    return filled


def _drop_channel(t: Any) -> torch.Tensor:
    """[1,*S] -> [*S] (2D or 3D), float32 on the CPU."""
    t = torch.as_tensor(t).detach().float().cpu()
    return t[0] if t.ndim in (3, 4) and t.shape[0] == 1 else t


def _mae(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    if mask is None:
        return float(np.abs(a - b).mean())
    if not mask.any():
        return float("nan")
    return float(np.abs(a - b)[mask].mean())


def texture_map(label: np.ndarray, cond: np.ndarray) -> np.ndarray:
    """LIDC texture (1..5) of every nodule voxel, 0 elsewhere: the condition mask holds texture/5."""
    t = np.rint(np.asarray(cond) * 5).astype(np.int64)
    return np.where(np.asarray(label) > 0, np.clip(t, 1, 5), 0)


def reconstruction_metrics(x: torch.Tensor, recon: torch.Tensor, lung: torch.Tensor | None = None,
                           label: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                           hu_range: tuple[float, float] = (-1000.0, 400.0)) -> dict[str, float]:
    """Metrics of one reconstruction.

    Args:
        x, recon: [1,*S] or [*S] on the [0,1] scale (HU clipped to ``hu_range``).
        lung, label, cond: optional masks of the same size (lung {0,1}, nodule label map, LAND
            condition with texture/5 on nodules) for the HU errors per region.
    Returns:
        {"mae": [0,1] units, "psnr" (dB, data range 1), "ssim", "mae_hu", and when masks are
        given "mae_hu_body", "mae_hu_lung", "mae_hu_nodule", "mae_hu_nodule_t1".."t5"} (NaN where
        a region is empty).
    """
    from monai.metrics import PSNRMetric, SSIMMetric

    xs = _drop_channel(x)
    rs = _drop_channel(recon).reshape(xs.shape)
    nd = xs.ndim
    lo, hi = hu_range
    a, b = xs.numpy(), rs.numpy()
    out: dict[str, float] = {"mae": _mae(a, b)}
    out["psnr"] = float(PSNRMetric(max_val=1.0)(rs.clamp(0, 1)[None, None], xs[None, None]).mean())
    win = 7 if min(xs.shape) >= 7 else (min(xs.shape) // 2) * 2 - 1
    out["ssim"] = float(SSIMMetric(spatial_dims=nd, data_range=1.0, win_size=win)(
        rs.clamp(0, 1)[None, None], xs[None, None]).mean())
    hu_a, hu_b = a * (hi - lo) + lo, np.clip(b, 0, 1) * (hi - lo) + lo
    out["mae_hu"] = _mae(hu_a, hu_b)
    lung_np = np.asarray(lung).reshape(a.shape) > 0 if lung is not None else None
    if nd == 3:
        out["mae_hu_body"] = _mae(hu_a, hu_b, body_mask(hu_a, lung_np))
    if lung_np is not None:
        out["mae_hu_lung"] = _mae(hu_a, hu_b, lung_np)
    if label is not None:
        lab = np.asarray(label).reshape(a.shape)
        out["mae_hu_nodule"] = _mae(hu_a, hu_b, lab > 0)
        if cond is not None:
            tex = texture_map(lab, np.asarray(cond).reshape(a.shape))
            for t in TEXTURES:
                out[f"mae_hu_nodule_t{t}"] = _mae(hu_a, hu_b, tex == t)
    return out


def mask_metrics(cond: torch.Tensor, recon: torch.Tensor) -> dict[str, float]:
    """Mask VAE: MAE on the [0,1] condition, voxel class accuracy after snapping to the nearest
    condition value (0 background, 0.1 lung, texture/5 for nodules; notes/DATA_API.md), and the
    Dice of the nodule region (any texture class)."""
    c = cond.detach().float().cpu().reshape(-1)
    r = recon.detach().float().cpu().reshape(-1)
    levels = torch.tensor([0.0, LUNG_COND, 0.2, 0.4, 0.6, 0.8, 1.0])
    snap = lambda v: levels[(v[:, None] - levels[None]).abs().argmin(1)]  # noqa: E731
    cs, rs = snap(c), snap(r)
    nod_c = cs >= 0.2 - 1e-6
    nod_r = rs >= 0.2 - 1e-6
    inter = float((nod_c & nod_r).sum())
    denom = float(nod_c.sum() + nod_r.sum())
    return {"mae": float((c - r).abs().mean()), "class_accuracy": float((cs == rs).double().mean()),
            "nodule_dice": 2 * inter / denom if denom > 0 else float("nan")}


def _items(ds: Any, max_items: int | None) -> range:
    n = len(ds)
    return range(n if max_items is None else min(n, max_items))


@torch.no_grad()
def evaluate_autoencoder(ae: Any, cfg: Any, split: str = "val", max_items: int | None = None,
                         baselines: Sequence[str] = ("area", "linear"), root: Any = None) -> Any:
    """Per-item reconstruction metrics of ``ae`` and of the resampling baselines on ``split``.

    Returns a pandas DataFrame with one row per (item, method); method is ``ae.kind``,
    ``"area+linear x4"`` or ``"linear x4"``. 3D CT rows carry the HU errors per region; mask VAE
    rows carry :func:`mask_metrics`.
    """
    import pandas as pd


    key = source_key(ae.kind)
    extra = ("lung", "label", "cond") if ae.kind == "vae3d" else ()
    ds = source_dataset(ae.kind, cfg, split, keys=extra, root=root)
    if len(ds) == 0:
        raise ValueError(f"the {split} split of the {cfg.profile} prepared data is empty; evaluate on another split")
    device = next(ae.parameters()).device
    hu = (float(cfg.data.hu_min), float(cfg.data.hu_max))
    rows = []
    for i in _items(ds, max_items):
        item = ds[i]
        x = torch.as_tensor(item[key]).float()[None]
        recon = ae.reconstruct(x.to(device), int(cfg.autoencoders.sliding_roi)).cpu()
        outs = {ae.kind: recon}
        for b in baselines:
            outs[("area+linear" if b == "area" else "linear") + f" x{ae.downsample}"] = \
                resample_baseline(x, ae.downsample, b)
        for method, r in outs.items():
            if ae.kind == "maskvae":
                m = mask_metrics(x, r)
            elif ae.kind == "vae3d":
                m = reconstruction_metrics(x[0], r[0], item.get("lung"), item.get("label"), item.get("cond"), hu)
            else:
                m = reconstruction_metrics(x[0], r[0], hu_range=hu)
            rows.append({"id": item_id(item, i), "method": method, **m})
    return pd.DataFrame(rows)


@torch.no_grad()
def nodule_errors(ae: Any, cfg: Any, split: str = "val", max_items: int | None = None, root: Any = None) -> Any:
    """MAE in HU over each nodule's voxels (vae3d): one row per (nodule, method) with the
    nodule's diameter_mm, texture and subtype from the prepared manifest."""
    import pandas as pd

    from lungsynth.data.datasets import load_nodules

    if ae.kind != "vae3d":
        raise ValueError(f"nodule_errors needs the 3D CT autoencoder (vae3d), got {ae.kind}")
    ds = source_dataset("vae3d", cfg, split, keys=("label",), root=root)
    nod = load_nodules(root if root is not None else cfg.profile)
    hu_lo, hu_hi = float(cfg.data.hu_min), float(cfg.data.hu_max)
    device = next(ae.parameters()).device
    rows = []
    for i in _items(ds, max_items):
        item = ds[i]
        x = torch.as_tensor(item["ct"]).float()[None]
        outs = {ae.kind: ae.reconstruct(x.to(device), int(cfg.autoencoders.sliding_roi)).cpu(),
                f"area+linear x{ae.downsample}": resample_baseline(x, ae.downsample, "area")}
        lab = np.asarray(item["label"])[0]
        a = x[0, 0].numpy() * (hu_hi - hu_lo) + hu_lo
        for _, n in nod[nod["scan_id"] == item["scan_id"]].iterrows():
            m = lab == int(n["label_value"])
            if not m.any():
                continue
            for method, r in outs.items():
                b = np.clip(r[0, 0].numpy(), 0, 1) * (hu_hi - hu_lo) + hu_lo
                rows.append({"nodule_id": n["nodule_id"], "scan_id": item["scan_id"], "method": method,
                             "diameter_mm": float(n["diameter_mm"]), "texture": int(n["texture"]),
                             "subtype": n["subtype"], "voxels": int(m.sum()),
                             "mae_hu": float(np.abs(a - b)[m].mean()),
                             "mean_hu_error": float((b - a)[m].mean())})
    return pd.DataFrame(rows)


def _pick_slice(x: np.ndarray, label: np.ndarray | None, axis: int) -> int:
    if label is not None and (label > 0).any():
        counts = (label > 0).sum(axis=tuple(a for a in range(3) if a != axis))
        return int(np.argmax(counts))
    return x.shape[axis] // 2


def plot_reconstructions(x: torch.Tensor, recons: dict[str, torch.Tensor], label: torch.Tensor | None = None,
                         axis: int = 0, index: int | None = None,
                         hu_range: tuple[float, float] = (-1000.0, 400.0), window: tuple[float, float] = (-1000, 400),
                         max_err_hu: float = 300.0, title: str | None = None, unit: str = "HU") -> Any:
    """One row per method: input, reconstruction, |error| in HU.

    Args:
        x: [1,*S] or [B,1,*S] (first item used), [0,1] scale; 2D or 3D.
        recons: {method name: reconstruction shaped like x}.
        label: optional nodule label map; 3D slices go through the largest nodule cross-section.
        axis / index: 3D slice axis (0 axial) and index (default as above, else the centre).
        window: HU display window; max_err_hu: top of the error colour scale; unit: its label
            (pass ``hu_range=(0, 1), unit=""`` for condition masks).
    Returns the matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    lo, hi = hu_range

    def to_hu(t: torch.Tensor) -> np.ndarray:
        a = t.detach().float().cpu().numpy()
        while a.ndim > 3 or (a.ndim == 3 and a.shape[0] == 1):
            a = a[0]
        return np.clip(a, 0, 1) * (hi - lo) + lo

    img = to_hu(x)
    lab = None
    if label is not None:
        lab = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
        lab = lab.reshape(img.shape)
    if img.ndim == 3:
        k = index if index is not None else _pick_slice(img, lab, axis)
        take = lambda a: np.take(a, k, axis=axis)  # noqa: E731
    else:
        k = None
        take = lambda a: a  # noqa: E731
    fig, axes = plt.subplots(len(recons), 3, figsize=(7.5, 2.5 * len(recons)), squeeze=False)
    for row, (name, r) in enumerate(recons.items()):
        rec = to_hu(r)
        err = np.abs(rec - img)
        panels = [(take(img), "input", "gray", window), (take(rec), name, "gray", window),
                  (take(err), f"|error| {unit} (MAE {err.mean():.3g})", "magma", (0, max_err_hu))]
        for col, (a, t, cmap, (vmin, vmax)) in enumerate(panels):
            ax = axes[row, col]
            im = ax.imshow(a, cmap=cmap, vmin=vmin, vmax=vmax)
            ax.set_title(t, fontsize=8)
            ax.axis("off")
            if col == 2:
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    if title or k is not None:
        fig.suptitle((title or "") + (f"  (slice {k}, axis {axis})" if k is not None else ""), fontsize=9)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- chapter 02's quality gates

CHAPTER = "02"
# An autoencoder that keeps one latent per 4^d voxels must do clearly better than keeping one value per
# 4^d voxels by resampling: at 0.6x the trilinear (bilinear) down-and-up error it has learned anatomy,
# not just a smooth interpolation (the margin the latent chapters need to see nodules through it).
MAE_FACTOR = 0.6
MIN_PERPLEXITY_SHARE = 0.25  # a codebook with under a quarter of its codes in effective use has collapsed
MIN_MASK_DICE = 0.5  # LAND's latentmask condition must keep nodules: at Dice 0.5 half of a nodule survives
MIN_ITEMS = 5  # held-out items a mean is judged on: fewer lets one odd scan decide the gate
GATE_SPLIT = "test"
GATES_FILE = "gates.json"
GATES_VERSION = 1  # raise when a gate's measurement or threshold changes: stored rows are then re-measured


def _trained_run(kind: str, cfg: Any, root: Any, run: Any = None) -> tuple[Any, str | None]:
    """(run dir, None) when ``kind`` has a finished run usable on ``root``'s held-out split, else (None, why)."""
    from lungsynth.autoencoders.model import default_run_dir
    from lungsynth.autoencoders.train import _final_with_scale, rebuild_command
    from lungsynth.data import fingerprint

    run = Path(run) if run is not None else default_run_dir(kind, cfg, create=False)
    if _final_with_scale(run) is None:
        return None, f"lungsynth autoencoder train --kind {kind} --profile {cfg.profile}"
    try:
        fingerprint.refuse_overlap(run, root, (GATE_SPLIT,), what=f"{kind} autoencoder")
    except ValueError as exc:  # other data, unknown or overlapping training patients: not judged on it
        return None, f"{rebuild_command(kind, cfg)}  ({str(exc).splitlines()[0][:160]})"
    return run, None


def _mean(table: Any, method: str, column: str) -> float:
    col = table.loc[table["method"] == method, column].astype(float)
    return float(col.mean(skipna=True)) if col.notna().any() else float("nan")


def reconstruction_gates(kind: str, ae: Any, cfg: Any, root: Any) -> list[Any]:
    """MAE (HU; body for 3D CT, whole image for 2D) of ``kind`` against the x4 linear resampling baseline,
    plus vae3d's nodule MAE per LIDC texture class (reported, no threshold)."""
    from lungsynth.gates import info, judge

    table = evaluate_autoencoder(ae, cfg, GATE_SPLIT, root=root)
    n = int(table["id"].nunique())
    base = f"linear x{ae.downsample}"
    col = "mae_hu_body" if kind == "vae3d" else "mae_hu"
    what = "body MAE (HU)" if kind == "vae3d" else "MAE (HU)"
    rows = [judge(CHAPTER, f"{kind}: {what} vs {base} resampling", _mean(table, kind, col), n=n,
                  n_needed=MIN_ITEMS, factor=MAE_FACTOR, baseline=_mean(table, base, col),
                  baseline_name=f"{base} (same items)")]
    if kind == "vae3d":
        for t in TEXTURES:
            key = f"mae_hu_nodule_t{t}"
            rows.append(info(CHAPTER, f"vae3d: nodule MAE (HU), texture {t}", _mean(table, kind, key),
                             n=int(table.loc[table["method"] == kind, key].notna().sum()),
                             baseline=_mean(table, f"area+linear x{ae.downsample}", key),
                             baseline_name=f"area+linear x{ae.downsample}"))
    return rows


def codebook_gate(ae: Any, cfg: Any, root: Any) -> Any:
    """VQ-VAE codebook perplexity over the held-out slices, against a quarter of the codebook."""
    from lungsynth.autoencoders.model import codebook_stats
    from lungsynth.gates import judge

    ds = source_dataset("vqvae2d", cfg, GATE_SPLIT, root=root)
    k = int(cfg.autoencoders.vq_num_embeddings)
    if len(ds) == 0:
        return judge(CHAPTER, "vqvae2d: codebook perplexity / K", None, n=0, n_needed=MIN_ITEMS,
                     at_least=MIN_PERPLEXITY_SHARE)
    x = torch.stack([torch.as_tensor(ds[i][source_key("vqvae2d")]).float() for i in range(len(ds))])
    stats = codebook_stats(ae.codebook_indices(x), k)
    return judge(CHAPTER, "vqvae2d: codebook perplexity / K", stats["perplexity"] / k, n=len(ds),
                 n_needed=MIN_ITEMS, at_least=MIN_PERPLEXITY_SHARE,
                 detail=f"perplexity {stats['perplexity']:.1f} of K = {k}; {stats['codes_used']} codes used")


def mask_dice_gate(ae: Any, cfg: Any, root: Any) -> Any:
    from lungsynth.gates import judge

    table = evaluate_autoencoder(ae, cfg, GATE_SPLIT, root=root)
    return judge(CHAPTER, "maskvae: nodule Dice", _mean(table, "maskvae", "nodule_dice"),
                 n=int(table["id"].nunique()), n_needed=MIN_ITEMS, at_least=MIN_MASK_DICE,
                 baseline=_mean(table, f"area+linear x{ae.downsample}", "nodule_dice"),
                 baseline_name=f"area+linear x{ae.downsample} (reported)")


@torch.no_grad()
def quality_gates(cfg: Any, root: Any = None, run_dirs: dict[str, Any] | None = None) -> list[Any]:
    """Chapter 02's gates on the held-out test split; an untrained kind is listed with its train command.
    ``run_dirs``: {kind: run dir} instead of the profile's ``runs/<profile>/02_<kind>``. Each kind's rows are
    stored beside its run (``gates.json``) and reused while its weights, the data and the gates are unchanged."""
    from lungsynth.autoencoders.model import KINDS
    from lungsynth.data import fingerprint
    from lungsynth.data.datasets import prepared_folder
    from lungsynth.gates import cached, file_digest, not_trained

    root = Path(root if root is not None else prepared_folder(cfg))
    rows: list[Any] = []
    for kind in KINDS:
        run, command = _trained_run(kind, cfg, root, (run_dirs or {}).get(kind))
        if run is None:
            rows.append(not_trained(CHAPTER, f"{kind} autoencoder", str(command)))
            continue
        key = {"gates": GATES_VERSION, "kind": kind, "weights": file_digest(run / "final.pt"),
               "data": fingerprint.load(root)["id"], "hu": [cfg.data.hu_min, cfg.data.hu_max]}
        rows += cached(run / GATES_FILE, key, lambda kind=kind, run=run: _measure(kind, run, cfg, root))
    return rows


def _measure(kind: str, run: Any, cfg: Any, root: Any) -> list[Any]:
    from lungsynth.autoencoders.model import load_autoencoder

    ae = load_autoencoder(kind, run, cfg)
    if kind == "maskvae":
        return [mask_dice_gate(ae, cfg, root)]
    rows = reconstruction_gates(kind, ae, cfg, root)
    if kind == "vqvae2d":
        rows.append(codebook_gate(ae, cfg, root))
    return rows
