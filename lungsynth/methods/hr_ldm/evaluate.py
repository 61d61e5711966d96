"""The chapter's own table: HR-LDM vs the MAISI-DDPM ablation (no histogram loss) on held-out nodules.

Each held-out nodule is regenerated in place (its own mask, subtype and histogram as conditions);
the row holds the per-subtype JSD of pooled lesion HU histograms (the paper's intensity metric), 2.5D
FID / KID / MMD and the mean |delta HU| outside the nodule.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from lungsynth.data import fingerprint
from lungsynth.data.datasets import data_source, prepared_root
from lungsynth.methods.hr_ldm.model import SUBTYPES, hu_histogram, js_divergence_np, unit_to_hu
from lungsynth.methods.hr_ldm.sample import HrLdm, inpaint_crops, load
from lungsynth.methods.hr_ldm.train import ensure_trained, train_crops

EVAL_SPLITS = ("val", "test")  # held-out nodules only


def _stack_items(items: Sequence[Mapping[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    ct = torch.stack([torch.as_tensor(it["ct"]).float() for it in items])
    hr = torch.stack([torch.as_tensor(it["hrmask"]).float() for it in items])
    return ct, hr, np.array([int(it["subtype_id"]) for it in items])


def generate_for_eval(model: HrLdm, items: Sequence[Mapping[str, Any]], n_per_subtype: int, seed: int = 0,
                      steps: int | None = None, batch: int = 8) -> dict[str, Any]:
    """Regenerate held-out nodules: for each subtype, up to ``n_per_subtype`` real crops of it (cycled
    when fewer) keep their background and mask; the lesion is inpainted with the crop's own subtype and
    HU histogram as conditions. Returns real and generated crops in HU [N, C, C, C], masks, subtypes."""
    cfg = model.cfg
    items = [it for it in items if float(torch.as_tensor(it["hrmask"])[0].sum()) > 0]
    if not items:
        raise ValueError("no evaluation crop has a non-empty nodule mask")
    ct, hr, sub = _stack_items(items)
    real, fake, masks, subs = [], [], [], []
    for y in range(3):
        idx = np.flatnonzero(sub == y)
        if idx.size == 0:
            continue
        pick = np.resize(idx, n_per_subtype)
        for i in range(0, len(pick), batch):
            j = pick[i:i + batch]
            hist = np.stack([hu_histogram(unit_to_hu(ct[k, 0], cfg), hr[k, 0], cfg.hr_ldm.hist_bins,
                                          tuple(cfg.hr_ldm.hist_range_hu)) for k in j])
            out = inpaint_crops(model, ct[j], hr[j], torch.full((len(j),), y), hist, steps=steps, seed=seed + i)
            real.append(unit_to_hu(ct[j, 0], cfg).numpy())
            fake.append(unit_to_hu(out["ct"][:, 0].cpu(), cfg).numpy())
            masks.append(hr[j, 0].numpy() > 0)
            subs.append(np.full(len(j), y))
    return {"real": np.concatenate(real), "fake": np.concatenate(fake), "mask": np.concatenate(masks),
            "subtype": np.concatenate(subs)}


def metrics_for(cfg: Any, gen: Mapping[str, np.ndarray], network: str | None = None) -> dict[str, Any]:
    """Per-subtype JSD of pooled lesion HU histograms, 2.5D FID/KID/MMD (mean over the three planes),
    and the mean |delta HU| outside the nodule mask after decoding."""
    from lungsynth.eval.distribution import evaluate_distribution
    from lungsynth.eval.features import features_25d

    bins, rng = cfg.hr_ldm.hist_bins, tuple(cfg.hr_ldm.hist_range_hu)
    row: dict[str, Any] = {}
    jsds = []
    for y, name in enumerate(SUBTYPES):
        keep = gen["subtype"] == y
        if not keep.any():
            row[f"jsd_{name}"] = float("nan")
            continue
        hr_ = hu_histogram(gen["real"][keep], gen["mask"][keep], bins, rng)
        hf_ = hu_histogram(gen["fake"][keep], gen["mask"][keep], bins, rng)
        row[f"jsd_{name}"] = js_divergence_np(hr_, hf_)
        jsds.append(row[f"jsd_{name}"])
    row["jsd_mean"] = float(np.mean(jsds)) if jsds else float("nan")
    net = network or ("astra" if cfg.evaluation.feature_network.startswith("astra") else "slicenet2d")
    fr, name = features_25d(gen["real"], "hu", network=net)
    ff, _ = features_25d(gen["fake"], "hu", network=net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # n < 50 is flagged in the row instead
        per_plane = [evaluate_distribution(fr[p], ff[p], cfg, network=name) for p in fr]
    for metric in ("fid", "kid", "mmd"):
        row[metric] = float(np.mean([float(pp[metric].value) for pp in per_plane]))
    row["delta_hu_outside"] = float(np.abs(gen["fake"] - gen["real"])[~gen["mask"]].mean())
    row["n"] = int(len(gen["fake"]))
    row["network"] = name
    return row


def evaluate(cfg: Any, models: Mapping[str, HrLdm] | None = None, *, items: Sequence[Mapping[str, Any]] | None = None,
             n_per_subtype: int | None = None, network: str | None = None, seed: int = 0) -> dict[str, Any]:
    """The chapter's ablation table: HR-LDM vs MAISI-DDPM (no histogram loss) on held-out nodules.

    Args:
        models: ``{"HR-LDM": model, "MAISI-DDPM (no hist loss)": model}`` (default: both, ensure_trained).
        items: evaluation crops (default the prepared val + test crops, train when those are empty).
        n_per_subtype: generated nodules per subtype (default ``cfg.hr_ldm.eval_per_subtype``).
    Returns:
        ``{"rows": [{"method", "jsd_solid", "jsd_part-solid", "jsd_ground-glass", "jsd_mean", "fid",
        "kid", "mmd", "delta_hu_outside", "n", "network"}], "generated": {method: arrays}}``.
    """
    if models is None:
        runs = {"HR-LDM": (ensure_trained(cfg, True), True),
                "MAISI-DDPM (no hist loss)": (ensure_trained(cfg, False), False)}
        for name, (run_dir, _) in runs.items():
            fingerprint.refuse_overlap(run_dir, prepared_root(cfg), EVAL_SPLITS, what=f"{name} run")
        models = {name: load(cfg, run_dir, hist) for name, (run_dir, hist) in runs.items()}
    if items is None:
        items = eval_items(cfg)
    n = int(n_per_subtype or cfg.hr_ldm.eval_per_subtype)
    rows, generated = [], {}
    for name, model in models.items():
        gen = generate_for_eval(model, items, n, seed=seed)
        generated[name] = gen
        rows.append({"method": name, **metrics_for(cfg, gen, network), "source": data_source(cfg)})
    return {"rows": rows, "generated": generated}


def _with_nodule(ds: Any) -> list[Mapping[str, Any]]:
    items = [ds[i] for i in range(len(ds))]
    return [it for it in items if float(torch.as_tensor(it["hrmask"])[0].sum()) > 0]


def eval_items(cfg: Any) -> list[Mapping[str, Any]]:
    """Held-out crops with a non-empty nodule mask: val + test (never a training patient's)."""
    items: list[Mapping[str, Any]] = []
    for split in EVAL_SPLITS:
        items += _with_nodule(train_crops(cfg, split))
    if not items:
        raise ValueError(f"the {'/'.join(EVAL_SPLITS)} splits of profile {cfg.profile} hold no nodule crop; "
                         "prepare more scans (cfg.data.n_scans)")
    return items
