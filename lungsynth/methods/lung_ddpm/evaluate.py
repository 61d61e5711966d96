"""Lung-DDPM's table: the metrics (FID, MMD, masked MSE, seam ratio) and the ablation rows of the paper's Table IV."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Sequence

from lungsynth.data import fingerprint
from lungsynth.data.datasets import data_source, prepared_root
from lungsynth.methods.lung_ddpm.model import generation_mask, make_layout
from lungsynth.methods.lung_ddpm.sample import LungDDPM, generate, load

if TYPE_CHECKING:
    import torch

    from lungsynth.config import Config

#: the ablation rows of Table IV: row name -> (training variant, AAS at sampling)
ABLATIONS: dict[str, tuple[str, bool]] = {
    "Lung-DDPM (AAS)": ("layout", True),
    "w/o AAS": ("layout", False),
    "w/o lung layout": ("no_lung_layout", True),
}


# --------------------------------------------------------------------------- metrics


def boundary_shell(mask: "torch.Tensor", width: int = 1) -> "torch.Tensor":
    """Voxels within ``width`` of the mask boundary, on both sides: dilate(m) and not erode(m).

    Args: mask [B, 1, *S] (bool or {0, 1}). Returns: bool [B, 1, *S].
    """
    import torch.nn.functional as F

    m = (mask > 0.5).float() if mask.dtype != __import__("torch").bool else mask.float()
    k = 2 * int(width) + 1
    pool = F.max_pool3d if m.ndim == 5 else F.max_pool2d
    dilated = pool(m, k, stride=1, padding=width) > 0.5
    eroded = pool(1.0 - m, k, stride=1, padding=width) < 0.5
    return dilated & ~eroded


def gradient_magnitude(x: "torch.Tensor") -> "torch.Tensor":
    """|grad x| by central differences (one-sided at the borders); [B, 1, *S] -> [B, 1, *S]."""
    import torch

    grads = torch.gradient(x.float(), dim=tuple(range(2, x.ndim)))
    return torch.sqrt(sum(g * g for g in grads))


def seam_ratio(sample_: "torch.Tensor", real: "torch.Tensor", mask: "torch.Tensor", width: int = 1,
               eps: float = 1e-8) -> "torch.Tensor":
    """Seam measure per volume: mean |grad| of the sample over the mean |grad| of the real volume, both
    in the shell of ``width`` voxels on each side of the lung boundary. 1 means edges as strong as
    the real anatomy's; above 1, a visible seam (or noise) at the boundary.

    Args: sample_, real [B, 1, *S]; mask [B or 1, 1, *S] (the lung, ``m_l``). Returns: float64 [B].
    """

    if sample_.shape != real.shape:
        raise ValueError(f"sample {tuple(sample_.shape)} and real {tuple(real.shape)} differ in shape")
    shell = boundary_shell(mask, width).expand_as(sample_).float()
    n = shell.sum(dim=tuple(range(1, shell.ndim)))
    if bool((n == 0).any()):
        raise ValueError("seam_ratio: the lung mask has no boundary in some volume (empty or full mask)")
    dims = tuple(range(1, shell.ndim))
    gs = (gradient_magnitude(sample_) * shell).sum(dim=dims) / n
    gr = (gradient_magnitude(real) * shell).sum(dim=dims) / n
    return (gs / gr.clamp_min(eps)).double()


def eval_volumes(cfg: "Config", split: str | None = None, n: int | None = None) -> dict[str, Any]:
    """Paired real volumes for evaluation: ``{"ct", "layout" [N, 1, S, S, S], "scan_id": [...]}``."""
    import torch

    from lungsynth.data.datasets import VolumeDataset, ensure_prepared

    split = split or cfg.lung_ddpm.eval_split
    ensure_prepared(cfg)
    ds = VolumeDataset(cfg, split, size=cfg.data.size_ddpm, keys=("ct", "lung", "label"))
    count = len(ds) if n is None else min(int(n), len(ds))
    if count == 0:
        raise ValueError(f"split {split!r} of profile {cfg.profile!r} has no volumes; pick another split "
                         f"with --set lung_ddpm.eval_split=...")
    items = [ds[i] for i in range(count)]
    return {"ct": torch.stack([it["ct"].float() for it in items]),
            "layout": torch.stack([make_layout(it["lung"][None], it["label"][None])[0] for it in items]),
            "scan_id": [it["scan_id"] for it in items]}


def metrics(cfg: "Config", samples: "torch.Tensor", real: "torch.Tensor", layouts: "torch.Tensor",
            real_features: Any = None) -> dict[str, Any]:
    """One row of the ablation table: FID, MMD (3D CT features), masked MSE in the lung, seam ratio.

    Args: samples, real [N, 1, S, S, S] in [0, 1] (paired); layouts [N, 1, S, S, S].
        real_features: ``(features, network)`` of ``real`` to reuse across rows.
    """
    import warnings

    from lungsynth.eval.distribution import fid, mmd
    from lungsynth.eval.features import extract_features
    from lungsynth.eval.fidelity import masked_mse

    unit_range = (cfg.data.hu_min, cfg.data.hu_max)
    network = cfg.evaluation.feature_network
    real_f, name = real_features or extract_features(real.numpy(), network, "unit", unit_range=unit_range)
    fake_f, _ = extract_features(samples.numpy(), network, "unit", unit_range=unit_range)
    lung = generation_mask(layouts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # few-sample warnings: the row says n
        f = fid(real_f, fake_f, network=name)
        m = mmd(real_f, fake_f, network=name)
    return {"fid": float(f.value), "mmd": float(m.value),
            "masked_mse": float(masked_mse(samples.numpy(), real.numpy(), lung.numpy()).mean()),
            "seam_ratio": float(seam_ratio(samples, real, lung).mean()), "n": int(samples.shape[0]),
            "features": name}


def evaluate(cfg: "Config", rows: Sequence[str] | None = None, *, split: str | None = None, n: int | None = None,
             seed: int = 0, outputs: dict | None = None, progress: bool = False) -> dict[str, dict[str, Any]]:
    """The ablation table (paper Table IV): ``{row: {fid, mmd, masked_mse, seam_ratio, n, seconds}}``.

    Trains the needed variants when missing. ``outputs``, when given, receives ``real``, ``layout``,
    ``scan_id`` and ``samples`` ({row: [N, 1, S, S, S]}) for figures.
    """
    from lungsynth.eval.features import extract_features

    rows = list(rows or ABLATIONS)
    unknown = [r for r in rows if r not in ABLATIONS]
    if unknown:
        raise ValueError(f"unknown ablation row(s) {unknown}; rows: {', '.join(ABLATIONS)}")
    data = eval_volumes(cfg, split, cfg.lung_ddpm.n_eval if n is None else n)
    real_f = extract_features(data["ct"].numpy(), cfg.evaluation.feature_network, "unit",
                              unit_range=(cfg.data.hu_min, cfg.data.hu_max))
    table: dict[str, dict[str, Any]] = {}
    samples: dict[str, Any] = {}
    models: dict[str, LungDDPM] = {}
    for row in rows:
        variant, aas = ABLATIONS[row]
        if variant not in models:
            models[variant] = load(cfg, variant, progress=progress)
            fingerprint.refuse_overlap(models[variant].run_dir, prepared_root(cfg), (split or cfg.lung_ddpm.eval_split,),
                                       what=f"Lung-DDPM {variant} run")
        t0 = time.perf_counter()
        samples[row] = generate(models[variant], data["layout"], data["ct"], aas=aas, seed=seed, progress=progress)
        seconds = time.perf_counter() - t0
        table[row] = {**metrics(cfg, samples[row], data["ct"], data["layout"], real_f), "source": data_source(cfg),
                      "sample_s_per_volume": round(seconds / data["ct"].shape[0], 3)}
    if outputs is not None:
        outputs.update(real=data["ct"], layout=data["layout"], scan_id=data["scan_id"], samples=samples)
    return table
