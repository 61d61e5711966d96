"""Chapter 10: nodule segmentation with MONAI's AttentionUnet, real only vs real + synthetic at ratios.

Two settings:

- ``volume``: whole volumes at ``cfg.data.size_ddpm`` (Lung-DDPM's end-to-end setting: the network sees the
  whole chest and must find and delineate the nodules); with ``cfg.downstream.seg_volume_patch`` it trains on
  nodule-biased patches of them (:class:`lungsynth.downstream.data.PatchDataset`) and still predicts whole volumes;
- ``crop``: nodule-centred crops of ``cfg.downstream.seg_crop_size``^3 at 1 mm.

Each is trained through the engine (nodule Dice + cross-entropy, ``monai.losses.DiceCELoss``) for every synthetic ratio
of ``cfg.downstream.synthetic_ratios`` (synthetic count = ratio x real count,
:func:`lungsynth.downstream.mixing.mix_ratio`) and every seed of ``cfg.downstream.n_runs``, and evaluated
per volume (Dice, sensitivity, specificity; :mod:`lungsynth.downstream.metrics`) on the real evaluation split.

With a separate cohort (``cfg.downstream.seg_condition_source = "validation"``, Lung-DDPM's Table I) the synthetic
items must be generated from the validation patients' layouts, and two more arms run (Table III): the real train set
plus those patients' *real* items (``+ real``) and plus as many synthetic items (``+ synthetic``,
:func:`lungsynth.downstream.mixing.cohort_arms`). Rows say which in ``arm``: ``real only``, ``+ synthetic``
(every ratio > 0 and the cohort-sized one) or ``+ real``. Several synthetic datasets are compared, never mixed:
each gets its own ``+ synthetic`` arms (``generator``, the dataset's folder) beside one real-only arm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

SETTINGS: tuple[str, ...] = ("volume", "crop")
METRICS: tuple[str, ...] = ("dice", "sensitivity", "specificity")


def build_segmenter(cfg: Any, seed: int = 0) -> Any:
    """MONAI AttentionUnet (3D, 1 channel in, 2 classes out), channels ``cfg.downstream.seg_channels``, stride 2.

    Input [B, 1, S, S, S] with S divisible by 2^(levels - 1); output logits [B, 2, S, S, S].
    """
    import torch
    from monai.networks.nets import AttentionUnet

    ch = tuple(int(c) for c in cfg.downstream.seg_channels)
    torch.manual_seed(int(seed))
    return AttentionUnet(spatial_dims=3, in_channels=1, out_channels=2, channels=ch, strides=(2,) * (len(ch) - 1))


def input_size(cfg: Any, setting: str) -> int:
    """Cube side of the network input: ``cfg.data.size_ddpm`` (volume) or ``cfg.downstream.seg_crop_size`` (crop)."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown segmentation setting {setting!r}; use one of {', '.join(SETTINGS)}")
    size = int(cfg.data.size_ddpm if setting == "volume" else cfg.downstream.seg_crop_size)
    div = 2 ** (len(cfg.downstream.seg_channels) - 1)
    if size % div:
        raise ValueError(f"segmentation input side {size} must be divisible by {div} (2^(levels-1) of "
                         f"downstream.seg_channels)")
    return size


def seg_loss_fn() -> Any:
    """``loss_fn(model, batch)`` for the engine: DiceCE on ``batch["image"]`` [B,1,S^3] vs ``batch["target"]`` [B,1,S^3]."""
    from monai.losses import DiceCELoss

    from lungsynth.downstream.common import random_flip

    # Dice of the nodule class only, over the whole batch (nnU-Net's "batch Dice"): with the background class in
    # the mean the loss sat on a 0.5 plateau for hundreds of steps (course crops, real only, one seed: Dice 0.04
    # after 150 steps and 0.24 after 400 with it; 0.07 after 150 and 0.44 after 300 in this form)
    loss = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)

    def fn(model: Any, batch: dict[str, Any]) -> Any:
        x, y = random_flip(batch["image"], batch["target"])
        return loss(model(x), y)

    return fn


def train_segmenter(cfg: Any, dataset: Any, seed: int = 0, steps: int | None = None) -> Any:
    """A fresh AttentionUnet trained on ``dataset`` (items ``image``, ``target``) for ``steps`` engine steps."""
    from lungsynth.downstream.common import fit

    model = build_segmenter(cfg, seed)
    return fit(cfg, model, seg_loss_fn(), dataset, int(steps or cfg.downstream.seg_steps),
               cfg.downstream.seg_batch_size, seed, kind="attention_unet")


def steps_for(cfg: Any, setting: str) -> int:
    """Training steps of ``setting``: ``cfg.downstream.seg_volume_steps`` for volumes when set (> 0), else
    ``cfg.downstream.seg_steps``."""
    volume_steps = int(cfg.downstream.seg_volume_steps)
    return volume_steps if setting == "volume" and volume_steps > 0 else int(cfg.downstream.seg_steps)


def training_view(cfg: Any, dataset: Any, seed: int = 0) -> Any:
    """What the segmenter trains on: ``dataset`` itself, or for volume items with ``cfg.downstream.seg_volume_patch``
    > 0, random patches of that side, half of them centred on a nodule voxel (:class:`PatchDataset`). Either way
    the network is evaluated on whole items: it is fully convolutional."""
    from lungsynth.downstream.data import PatchDataset

    patch = int(cfg.downstream.seg_volume_patch)
    if dataset.kind != "volume" or patch <= 0:
        return dataset
    div = 2 ** (len(cfg.downstream.seg_channels) - 1)
    if patch % div or patch > dataset.size:
        raise ValueError(f"downstream.seg_volume_patch {patch} must be divisible by {div} and at most the volume side "
                         f"{dataset.size}")
    return PatchDataset(dataset, patch, seed)


def predict(model: Any, dataset: Any, batch_size: int = 2) -> list[np.ndarray]:
    """Binary masks [S, S, S] (argmax of the two classes) for every item of ``dataset``."""
    import torch

    from lungsynth import runtime

    dev = next(model.parameters()).device if any(True for _ in model.parameters()) else runtime.device()
    out = []
    model.eval()
    with torch.no_grad():
        for s in range(0, len(dataset), batch_size):
            x = torch.stack([dataset[i]["image"] for i in range(s, min(s + batch_size, len(dataset)))]).to(dev)
            with runtime.autocast(dev):
                logits = model(x).float()
            out += [p.cpu().numpy().astype(bool) for p in logits.argmax(1)]
    return out


def evaluate_segmenter(model: Any, dataset: Any) -> list[dict[str, Any]]:
    """Per item of ``dataset``: ``item_id, dice, sensitivity, specificity`` (voxel-wise, per volume or crop) and
    ``empty_target``. A crop whose nodule left no voxel on the shared grid (a 3-4 mm nodule at 2.7 mm) has no
    Dice: it is NaN, so means skip it, where an empty prediction would have scored it 1 and any other 0."""
    from lungsynth.downstream.metrics import segmentation_metrics

    preds = predict(model, dataset)
    rows = []
    for i, p in enumerate(preds):
        t = dataset[i]["target"][0].numpy() > 0.5
        row = {"item_id": dataset.table.iloc[i]["item_id"], **segmentation_metrics(p, t), "empty_target": not t.any()}
        if dataset.kind == "crop" and row["empty_target"]:
            row["dice"] = float("nan")
        rows.append(row)
    return rows


def training_sets(cfg: Any, pools: Any, ratios: Sequence[float], seed: int) -> list[tuple[str, str, float, Any]]:
    """``(arm, generator, ratio, table)`` for one seed: the real-only set (ratio 0), each ratio > 0 of ``ratios`` for
    each synthetic dataset of the pool on its own (``generator``: its folder name; "" for real-only arms), then with
    a cohort (``pools.cohort``) the ``+ real`` arm and each generator's ``+ synthetic`` arm at the cohort's ratio
    (its item count over the real train count)."""
    from lungsynth.downstream.mixing import by_generator, cohort_arms, mix_ratio

    repeats = bool(cfg.downstream.allow_repeats)
    pools_of = by_generator(pools.synthetic)
    sets = [("real only", "", 0.0, pools.train)] if 0.0 in [float(r) for r in ratios] or not pools_of else []
    sets += [("+ synthetic", g, float(r), mix_ratio(pools.train, pool, r, seed, repeats))
             for g, pool in pools_of.items() for r in ratios if float(r) > 0]
    if pools.cohort is not None and len(pools.cohort):
        ratio = round(len(pools.cohort) / max(len(pools.train), 1), 3)
        sets.append(("+ real", "", ratio, cohort_arms(pools.train, pools.cohort, None)["+ real"]))
        sets += [("+ synthetic", g, ratio, cohort_arms(pools.train, pools.cohort, pool, seed, repeats)["+ synthetic"])
                 for g, pool in pools_of.items()]
    return sets


@dataclass
class SegResult:
    """What :func:`run_segmentation` measured.

    ``runs``: one row per (setting, generator, arm, ratio, seed) with the means over evaluation items and the
    training composition; ``items``: one row per evaluated item; ``table``: mean and std over seeds per (setting,
    generator, arm, ratio); ``trainings_reused``: trainings an earlier, killed run of the same settings had finished.
    """

    runs: Any
    items: Any
    table: Any
    synthetic: list[str] = field(default_factory=list)
    seconds: float = 0.0
    trainings_reused: int = 0


def run_segmentation(cfg: Any, synthetic: Any = None, *, settings: Sequence[str] | None = None,
                     ratios: Sequence[float] | None = None, n_runs: int | None = None,
                     real_root: Path | str | None = None, out: Path | str | None = None,
                     progress: bool | None = None) -> SegResult:
    """Train and evaluate AttentionUnets for every setting x ratio x seed.

    Args:
        synthetic: synthetic dataset folders (``"D1,D2"`` or a list), each its own arms; None: real only.
        settings: ``"volume"`` and / or ``"crop"`` (default ``cfg.downstream.seg_settings``).
        ratios: default ``cfg.downstream.synthetic_ratios`` (only 0 without synthetic data).
        out: folder for ``seg_runs.csv``, ``seg_items.csv``, ``seg_table.csv`` and ``run.json``; its ``trainings``
            folder keeps each finished training's scores, so a killed run resumes with them.
        progress: a bar over the trainings (None: where stderr is a terminal or a notebook).
    Raises:
        ValueError: a bad synthetic dataset, a test-patient leak, a ratio the pool cannot fill.
    """
    import json
    import time

    import pandas as pd

    from lungsynth.downstream.common import Trainings, cohort_split, load_pools, seeds
    from lungsynth.downstream.data import ItemDataset
    from lungsynth.downstream.metrics import aggregate
    from lungsynth.downstream.mixing import check_no_leak, composition

    t0 = time.perf_counter()
    ratios = [float(r) for r in (ratios if ratios is not None else cfg.downstream.synthetic_ratios)]
    cohort = cohort_split(cfg)
    run_rows, item_rows, used = [], [], []
    trainings = None
    for setting in (settings if settings is not None else cfg.downstream.seg_settings):
        size = input_size(cfg, setting)
        pools = load_pools(cfg, "volume" if setting == "volume" else "nodule", synthetic, real_root, cohort=cohort)
        used = [str(p) for p in pools.synthetic_paths]
        kind = "volume" if setting == "volume" else "crop"
        store: dict = {}  # each item loaded once for all ratios and seeds (a course volume: 0.18 s to read and resize)
        eval_ds = ItemDataset(cfg, pools.evaluation, kind, size, store)
        trainings = trainings or Trainings(cfg, out, pools.real_root, "chapter 10 trainings", progress)
        for seed in seeds(cfg, n_runs):
            arms = list(training_sets(cfg, pools, ratios, seed))
            trainings.plan(len(arms))
            for arm, generator, ratio, train in arms:
                check_no_leak(train, pools.heldout, ("test",) + tuple(cfg.downstream.eval_splits))
                done = trainings.key(setting, seed, train, pools.evaluation)
                kept = trainings.get(done)
                if kept is None:
                    model = train_segmenter(cfg, training_view(cfg, ItemDataset(cfg, train, kind, size, store), seed),
                                            seed, steps_for(cfg, setting))
                    per_item = evaluate_segmenter(model, eval_ds)
                    trainings.put(done, items=json.dumps(per_item, default=float))
                else:
                    per_item = json.loads(kept["items"])
                trainings.done()
                means = pd.DataFrame(per_item)[list(METRICS)].mean(skipna=True).to_dict()
                key = {"setting": setting, "generator": generator, "arm": arm, "ratio": ratio, "seed": seed}
                run_rows.append({**key, **means, **composition(train)})
                item_rows += [{**key, **r} for r in per_item]
    if trainings is not None:
        trainings.close()
    runs, items = pd.DataFrame(run_rows), pd.DataFrame(item_rows)
    table = aggregate(runs, ["setting", "generator", "arm", "ratio"], METRICS)
    res = SegResult(runs, items, table, used, round(time.perf_counter() - t0, 2),
                    trainings.reused if trainings is not None else 0)
    if out is not None:
        _save(cfg, res, Path(out), pools.real_root)
    return res


def _save(cfg: Any, res: SegResult, out: Path, real_root: Path) -> None:
    from lungsynth.downstream.common import save_result

    save_result(cfg, out, "lungsynth downstream seg", {"seg_runs": res.runs, "seg_items": res.items,
                                                         "seg_table": res.table},
                real_root=real_root, synthetic=res.synthetic, seconds=res.seconds, table=res.table.to_dict("records"))
