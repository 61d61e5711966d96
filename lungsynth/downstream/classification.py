"""Chapter 11: nodule subtype and malignancy classification with MONAI's 3D DenseNet121 on nodule-centred crops.

Experiments (each over ``cfg.downstream.n_runs`` independent runs, seeds ``cfg.seed + k``):

- **subtype** (solid / part-solid / ground-glass): ``real`` (the imbalanced real train set) against
  ``balanced`` (minority classes topped up with synthetic nodules, :func:`lungsynth.downstream.mixing.balance_classes`);
  AUROC and AUPRC per subtype (one vs rest), overall and stratified by nodule size (6-10, 10-20, 20-30 mm), with
  two-sided Mann-Whitney U p-values between the two settings over runs;
- **scarcity**: ``cfg.downstream.real_fractions`` of the real train set (nested, stratified by subtype), alone
  (``real``), with proportional synthetic data and with the full synthetic pool;
- **ratio** (optional): the subtype classifier on the real train set plus ``ratio x real count`` synthetic nodules
  drawn at random (not balanced), for each ratio of ``cfg.downstream.synthetic_ratios``;
- **malignancy**: LIDC median malignancy 4-5 (malignant, 1) against 1-2 (benign, 0); **score 3
  (indeterminate) is left out** of training and evaluation. The paper's three arms: from scratch, initialised from
  the subtype model trained on the imbalanced real set, and (with a synthetic pool) from the one trained on the
  balanced set (every layer but the classifier head), with the balanced-vs-imbalanced p-value
  (:func:`malignancy_table`).

With several synthetic datasets each is compared on its own, never mixed with another: every synthetic arm above
runs once per dataset, named ``"<arm> [<dataset folder>]"`` (:func:`arm_name`), beside one real arm.

Each run holds out ``cfg.downstream.val_fraction`` of the real training patients (20%, the paper's 80/20 split;
:func:`lungsynth.downstream.mixing.validation_split`) as a real-only validation set: every classifier keeps the
weights of its lowest validation cross-entropy (early stopping); synthetic items only ever join the training part.
With ``cfg.downstream.cls_cross_validation`` (``full``) run k validates on fold k of one partition instead: the
paper's five-fold cross-validation for model selection (:func:`run_fold`).

Nodules: those of ``cfg.downstream.cls_size_range_mm`` (6-30 mm, the paper's Sec. 5.1), real and synthetic, in
training and evaluation (:func:`sized_pools`; the composition table counts what was left out).

Crops: ``cfg.downstream.cls_crop_size``^3 at 1 mm (90 at full scale, the paper's), the prepared crop views for real
nodules and crops cut from the synthetic volumes around each synthetic nodule's centroid (with a synthetic pool every
crop is cut from its volume, :func:`lungsynth.downstream.data.same_resolution`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lungsynth.downstream.data import SUBTYPES

MALIGNANCY_NAMES = {0: "benign (1-2)", 1: "malignant (4-5)"}
SUBTYPE_NAMES = dict(enumerate(SUBTYPES))


def malignancy_label(score: float) -> int | None:
    """LIDC median malignancy -> 1 (4-5, malignant), 0 (1-2, benign), None (3 or missing: left out)."""
    if score is None or not np.isfinite(float(score)):
        return None
    s = float(score)
    if s >= 4:
        return 1
    if s <= 2:
        return 0
    return None


def build_classifier(cfg: Any, n_classes: int, seed: int = 0) -> Any:
    """MONAI DenseNet121 (spatial_dims=3, 1 channel in, ``n_classes`` logits out).

    ``cfg.downstream.cls_init_features`` / ``cls_growth_rate`` / ``cls_blocks`` size it (64 / 32 /
    (6, 12, 24, 16) is the original). Input [B, 1, C, C, C] with C >= 32; output [B, n_classes].
    """
    import torch
    from monai.networks.nets import DenseNet121

    torch.manual_seed(int(seed))
    return DenseNet121(spatial_dims=3, in_channels=1, out_channels=int(n_classes),
                       init_features=int(cfg.downstream.cls_init_features),
                       growth_rate=int(cfg.downstream.cls_growth_rate),
                       block_config=tuple(int(b) for b in cfg.downstream.cls_blocks))


def init_from(model: Any, source: Any) -> list[str]:
    """Copy every weight of ``source`` whose name and shape match into ``model`` (all but the classifier head).

    Returns the names that were not copied.
    """
    own = model.state_dict()
    src = source.state_dict()
    keep = {k: v for k, v in src.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict({**own, **keep})
    return sorted(set(own) - set(keep))


def cls_loss_fn() -> Any:
    """``loss_fn(model, batch)``: cross-entropy of ``model(batch["image"])`` against ``batch["label"]`` (flip-augmented)."""
    import torch.nn.functional as F

    from lungsynth.downstream.common import random_flip

    def fn(model: Any, batch: dict[str, Any]) -> Any:
        (x,) = random_flip(batch["image"])
        return F.cross_entropy(model(x), batch["label"].long())

    return fn


def cls_val_fn() -> Any:
    """``val_fn(model, batch) -> {"loss"}``: the cross-entropy of a validation batch, without augmentation."""
    import torch.nn.functional as F

    def fn(model: Any, batch: dict[str, Any]) -> dict[str, float]:
        return {"loss": float(F.cross_entropy(model(batch["image"]).float(), batch["label"].long()))}

    return fn


def train_classifier(cfg: Any, dataset: Any, n_classes: int, seed: int = 0, init: Any = None,
                     steps: int | None = None, validation: Any = None) -> Any:
    """A DenseNet121 trained on ``dataset`` (items ``image``, ``label``); ``init`` a model to start from.

    ``validation`` (real items only): early stopping on its cross-entropy every ``cfg.downstream.cls_val_every``
    steps (:func:`lungsynth.downstream.common.fit`); the model keeps its best validation step's weights.
    """
    from lungsynth.downstream.common import fit

    model = build_classifier(cfg, n_classes, seed)
    if init is not None:
        init_from(model, init)
    return fit(cfg, model, cls_loss_fn(), dataset, int(steps or cfg.downstream.cls_steps),
               cfg.downstream.cls_batch_size, seed, kind="densenet121", validation=validation,
               val_fn=cls_val_fn(), val_every=int(cfg.downstream.cls_val_every),
               patience=int(cfg.downstream.cls_patience))


def predict_proba(model: Any, dataset: Any, batch_size: int = 8) -> np.ndarray:
    """Softmax probabilities [N, K] of every item of ``dataset``."""
    import torch

    from lungsynth.runtime import autocast

    dev = next(model.parameters()).device
    out = []
    model.eval()
    with torch.no_grad():
        for s in range(0, len(dataset), batch_size):
            x = torch.stack([dataset[i]["image"] for i in range(s, min(s + batch_size, len(dataset)))]).to(dev)
            with autocast(dev):
                logits = model(x).float()
            out.append(torch.softmax(logits, 1).cpu().numpy())
    return np.concatenate(out)


def subtype_scores(y: Sequence[int], proba: np.ndarray, diameters: Sequence[float]) -> list[dict[str, Any]]:
    """AUROC/AUPRC per subtype, over all evaluation nodules (``size="all"``) and per size bin."""
    from lungsynth.downstream.metrics import SIZE_BINS, one_vs_rest, size_bin

    y = np.asarray(y)
    bins = np.array([size_bin(d) for d in diameters], dtype=object)
    rows = [{"size": "all", **r} for r in one_vs_rest(y, proba, range(3), SUBTYPE_NAMES)]
    for lo, hi in SIZE_BINS:
        name = f"{lo:g}-{hi:g}"
        sel = bins == name
        if sel.any():
            rows += [{"size": name, **r} for r in one_vs_rest(y[sel], proba[sel], range(3), SUBTYPE_NAMES)]
    return rows


@dataclass
class ClsResult:
    """What :func:`run_classification` measured (DataFrames; empty where an experiment did not run).

    ``subtype_runs``: one row per (setting, seed, size, class); ``subtype_table``: mean/std over runs plus
    ``p_value`` (Mann-Whitney, balanced vs real) per (size, class); ``scarcity_runs`` / ``scarcity_table``;
    ``malignancy_runs`` / ``malignancy_table`` (:func:`malignancy_table`: balanced vs imbalanced initialisation, and
    each against scratch);
    ``curves``: ``{(experiment, setting, seed): (y_true, proba)}`` for precision-recall curves;
    ``composition``: training-set counts per setting; ``ratio_runs`` / ``ratio_table``: the ratio experiment
    (``setting`` "real" at ratio 0, "+ synthetic" above it); ``trainings_reused``: trainings an earlier run had
    finished. With several synthetic datasets every synthetic arm is
    named per dataset (:func:`arm_name`).
    """

    subtype_runs: Any
    subtype_table: Any
    scarcity_runs: Any
    scarcity_table: Any
    malignancy_runs: Any
    malignancy_table: Any
    curves: dict = field(default_factory=dict)
    composition: Any = None
    synthetic: list[str] = field(default_factory=list)
    seconds: float = 0.0
    ratio_runs: Any = None
    ratio_table: Any = None
    trainings_reused: int = 0  # trainings read back from an earlier, killed run of the same settings


def _with_pvalues(runs: Any, by: Sequence[str], setting_col: str, a: str | Sequence[str], b: str,
                  metrics: Sequence[str]) -> Any:
    """Aggregate ``runs`` over seeds per (setting, *by*) and add ``p_<metric>`` (Mann-Whitney) per *by*: a row of a
    setting of ``a`` (one name or several, one per synthetic dataset) compares it with ``b``; the other rows carry
    the p-value of the only ``a`` (NaN when there are several)."""
    from lungsynth.downstream.metrics import aggregate, mann_whitney_p

    tests = [a] if isinstance(a, str) else list(a)
    table = aggregate(runs, [setting_col, *by], metrics)
    for m in metrics:
        ps = {}
        for key, g in runs.groupby(list(by), sort=False, dropna=False):
            key = key if isinstance(key, tuple) else (key,)
            for t in tests:
                ps[(t, *key)] = mann_whitney_p(g.loc[g[setting_col] == t, m], g.loc[g[setting_col] == b, m])

        def p_of(row: Any) -> float:
            own = row[setting_col] if row[setting_col] in tests else (tests[0] if len(tests) == 1 else None)
            return ps.get((own, *(row[c] for c in by)), float("nan"))

        table[f"p_{m}"] = [p_of(r) for _, r in table.iterrows()]
    return table


def run_fold(cfg: Any, seed: int) -> tuple[int, int]:
    """``(split seed, fold)`` of the run with ``seed``: with ``cfg.downstream.cls_cross_validation`` run k (seed
    ``cfg.seed + k``) validates on fold k of one partition (five-fold cross-validation, HR-LDM §5.3); else each
    run draws fold 0 of its own partition."""
    if not cfg.downstream.cls_cross_validation or float(cfg.downstream.val_fraction) == 0:
        return int(seed), 0
    k, folds = int(seed) - int(cfg.seed), max(2, int(round(1.0 / float(cfg.downstream.val_fraction))))
    if not 0 <= k < folds:
        raise ValueError(f"run {k} (seed {seed}): cross-validation has {folds} folds (downstream.val_fraction "
                         f"{cfg.downstream.val_fraction}); set downstream.n_runs <= {folds}")
    return int(cfg.seed), k


def arm_name(name: str, generator: str, generators: Sequence[str]) -> str:
    """The name of a synthetic arm: ``name`` itself with one synthetic dataset, ``"name [generator]"`` with several
    (each dataset is compared on its own, never mixed with another)."""
    return name if len(generators) <= 1 else f"{name} [{generator}]"


def malignancy_table(runs: Any, metrics: Sequence[str] = ("auroc", "auprc")) -> Any:
    """Mean and spread of each malignancy arm over runs, with Mann-Whitney p-values: ``p_<metric>`` the paper's
    comparison (initialised from the balanced subtype model against the imbalanced one, named in ``compares``;
    without a synthetic pool, the subtype initialisation against scratch) and ``p_<metric>_vs_scratch`` each
    initialisation against training from scratch."""
    from lungsynth.downstream.metrics import mann_whitney_p

    runs = runs.assign(task="malignancy")
    inits = list(dict.fromkeys(runs["init"]))
    balanced = [i for i in inits if i.startswith("subtype (balanced")]
    a, b = (balanced, "subtype (real)") if balanced else ([inits[-1]], "scratch")
    table = _with_pvalues(runs, ["task"], "init", a, b, metrics)
    table["compares"] = [f"{i if i in a else a[0]} vs {b}" if i in a or len(a) == 1 else "" for i in table["init"]]
    for m in metrics:
        scratch = runs.loc[runs["init"] == "scratch", m]
        table[f"p_{m}_vs_scratch"] = [float("nan") if i == "scratch" else
                                      mann_whitney_p(runs.loc[runs["init"] == i, m], scratch) for i in table["init"]]
    return table


def sized_pools(pools: Any, size_range_mm: Sequence[float]) -> tuple[Any, dict[str, Any]]:
    """``pools`` (:class:`lungsynth.downstream.common.Pools`) with only the nodules within ``size_range_mm``
    (:func:`lungsynth.downstream.data.in_size_range`), and the rows left out per table, keyed for the composition
    table (``"left out: real train outside 6-30 mm"``; empty tables omitted)."""
    import dataclasses

    from lungsynth.downstream.data import in_size_range

    if not size_range_mm:
        return pools, {}
    span = "-".join(f"{float(v):g}" for v in size_range_mm)
    kept, left_out = {}, {}
    for name, what in (("train", "real train"), ("evaluation", "real evaluation"), ("synthetic", "synthetic pool")):
        table = getattr(pools, name)
        if table is None:
            continue
        inside = in_size_range(table, size_range_mm)
        kept[name] = table[inside].reset_index(drop=True)
        if not inside.all():
            left_out[f"left out: {what} outside {span} mm"] = table[~inside]
    if not len(kept["evaluation"]):
        raise ValueError(f"no evaluation nodule of {span} mm in {pools.real_root}; set downstream.cls_size_range_mm "
                         f"to () to read every size")
    return dataclasses.replace(pools, **kept), left_out


def run_classification(cfg: Any, synthetic: Any = None, *,
                       experiments: Sequence[str] = ("subtype", "scarcity", "malignancy"),
                       n_runs: int | None = None, ratios: Sequence[float] | None = None, real_root: Path | str | None = None,
                       out: Path | str | None = None, progress: bool | None = None) -> ClsResult:
    """Run the chapter's experiments (see the module docstring) and return their tables.

    Args:
        synthetic: synthetic dataset folders (``"D1,D2"`` or a list), each its own arms: volume datasets (HR-LDM
            inpainting, LAND texture control, Lung-DDPM) or crop datasets; None runs the real-only rows.
        experiments: any of ``subtype``, ``scarcity``, ``malignancy``, ``ratio``.
        ratios: synthetic ratios of the ``ratio`` experiment (default ``cfg.downstream.synthetic_ratios``).
        out: folder for the CSV tables and ``run.json``; its ``trainings`` folder keeps each finished training, so
            a killed run resumes with them (:class:`lungsynth.downstream.common.Trainings`).
        progress: a bar over the trainings (None: where stderr is a terminal or a notebook).
    """
    import time

    import pandas as pd

    from lungsynth.downstream import mixing
    from lungsynth.downstream.common import Trainings, finite_mean, load_pools, seeds
    from lungsynth.downstream.data import ItemDataset, LabelView
    from lungsynth.downstream.metrics import aggregate, one_vs_rest
    from lungsynth.downstream.mixing import (balance_classes, check_no_leak, composition, mix_ratio, scarcity_sets,
                                             validation_split)

    unknown = sorted(set(experiments) - {"subtype", "scarcity", "malignancy", "ratio"})
    if unknown:
        raise ValueError(f"unknown experiments {unknown}; use subtype, scarcity, malignancy, ratio")
    t0 = time.perf_counter()
    pools, left_out = sized_pools(load_pools(cfg, "nodule", synthetic, real_root), cfg.downstream.cls_size_range_mm)
    size = int(cfg.downstream.cls_crop_size)
    held = ("test",) + tuple(cfg.downstream.eval_splits)
    ev = pools.evaluation.reset_index(drop=True)
    eval_ds = ItemDataset(cfg, ev, "crop", size)
    y_eval = ev["subtype_id"].astype(int).to_numpy()
    allow = bool(cfg.downstream.allow_repeats)
    by_generator = mixing.by_generator(pools.synthetic)  # each synthetic dataset its own arms (arm_name), never mixed
    names = list(by_generator)
    trainings = Trainings(cfg, out, pools.real_root, "chapter 11 trainings", progress)

    def classify(label: str, table: Any, val_table: Any, dataset: Any, val_ds: Any, scored: Any, scored_table: Any,
                 seed: int, n_classes: int, init: Any = None) -> tuple[Any, np.ndarray]:
        """A classifier trained on ``table`` and its probabilities on ``scored``; read back when an earlier,
        killed run of the same settings had finished it."""
        import torch

        key = trainings.key(label, n_classes, seed, table, val_table, scored_table,
                            getattr(init, "training_key", "scratch"))
        kept = trainings.get(key)
        if kept is None:
            model = train_classifier(cfg, dataset, n_classes, seed, init=init, validation=val_ds)
            proba = predict_proba(model, scored)
            trainings.put(key, state=model.state_dict(), best_step=int(model.best_step),
                          proba=torch.from_numpy(np.ascontiguousarray(proba)))
        else:
            model = build_classifier(cfg, n_classes, seed)
            model.load_state_dict(kept["state"])
            model.best_step, proba = int(kept["best_step"]), kept["proba"].numpy()
            model.eval()
        model.training_key = key
        trainings.done()
        return model, proba

    def subtype_ds(table: Any) -> Any:
        check_no_leak(table, pools.heldout, held)
        return LabelView(ItemDataset(cfg, table, "crop", size), table["subtype_id"].astype(int).tolist())

    val_fraction = float(cfg.downstream.val_fraction)

    def real_split(seed: int) -> tuple[Any, Any]:  # (train, validation) of the real patients, per run
        split_seed, fold = run_fold(cfg, seed)
        return validation_split(pools.train, val_fraction, split_seed, "subtype_id", fold=fold)

    def validation_ds(table: Any) -> Any:
        return subtype_ds(table) if len(table) else None

    def settings_of(seed: int) -> dict[str, Any]:  # the synthetic items top up the run's training part only
        fit_part = real_split(seed)[0]
        out = {"real": fit_part}
        for g, pool in by_generator.items():
            out[arm_name("balanced", g, names)] = balance_classes(fit_part, pool, "subtype_id", seed, (0, 1, 2),
                                                                 allow)[0]
        return out

    first = seeds(cfg, n_runs)[0]
    comp_rows = [{"setting": name, "seed": first, **composition(table, "subtype_id")}
                 for name, table in {**settings_of(first), "validation (real)": real_split(first)[1],
                                     **left_out}.items()]
    sub_rows, curves, sub_models = [], {}, {}
    if "subtype" in experiments or "malignancy" in experiments:
        trainings.plan(len(seeds(cfg, n_runs)) * (1 + len(names)))
        for seed in seeds(cfg, n_runs):
            val_part = real_split(seed)[1]
            val_ds = validation_ds(val_part)
            for name, table in settings_of(seed).items():
                model, proba = classify("subtype_id", table, val_part, subtype_ds(table), val_ds, eval_ds, ev, seed, 3)
                sub_models[(name, seed)] = model
                curves[("subtype", name, seed)] = (y_eval, proba)
                sub_rows += [{"setting": name, "seed": seed, "best_step": model.best_step, **r}
                             for r in subtype_scores(y_eval, proba, ev["diameter_mm"].to_numpy())]
    sub_runs = pd.DataFrame(sub_rows)
    balanced = [arm_name("balanced", g, names) for g in names] or ["balanced"]
    sub_table = (_with_pvalues(sub_runs, ["size", "class"], "setting", balanced, "real", ("auroc", "auprc"))
                 if len(sub_runs) else pd.DataFrame())

    sc_rows = []
    if "scarcity" in experiments:
        fractions = cfg.downstream.real_fractions
        for seed in seeds(cfg, cfg.downstream.scarcity_runs):
            fit_part, val_part = real_split(seed)
            val_ds = validation_ds(val_part)
            cells = scarcity_sets(fit_part, None, fractions, seed, "subtype_id", ("real",))
            for g, pool in by_generator.items():
                cells.update({(f, arm_name(mode, g, names)): t for (f, mode), t in
                              scarcity_sets(fit_part, pool, fractions, seed, "subtype_id", ("proportional", "full"))
                              .items()})
            trainings.plan(len(cells))
            for (frac, mode), table in cells.items():
                _, proba = classify("subtype_id", table, val_part, subtype_ds(table), val_ds, eval_ds, ev, seed, 3)
                rows = one_vs_rest(y_eval, proba, range(3), SUBTYPE_NAMES)
                sc_rows.append({"real_fraction": frac, "synthetic": mode, "seed": seed,
                                "macro_auroc": finite_mean([r["auroc"] for r in rows]),
                                "macro_auprc": finite_mean([r["auprc"] for r in rows]),
                                **{f"auroc_{r['class']}": r["auroc"] for r in rows},
                                **{f"auprc_{r['class']}": r["auprc"] for r in rows},  # Fig. 7: per class
                                **composition(table)})
    sc_runs = pd.DataFrame(sc_rows)
    sc_table = (aggregate(sc_runs, ["real_fraction", "synthetic"], ("macro_auroc", "macro_auprc"))
                if len(sc_runs) else pd.DataFrame())

    ra_rows = []
    if "ratio" in experiments:
        rs = [float(r) for r in (ratios if ratios is not None else cfg.downstream.synthetic_ratios)]
        arms = [("real", None, 0.0)] if 0.0 in rs or not by_generator else []
        arms += [(arm_name("+ synthetic", g, names), pool, r) for g, pool in by_generator.items() for r in rs if r > 0]
        trainings.plan(len(arms) * len(seeds(cfg, n_runs)))
        for setting, pool, r in arms:
            for seed in seeds(cfg, n_runs):
                fit_part, val_part = real_split(seed)
                table = mix_ratio(fit_part, pool, r, seed, allow)
                _, proba = classify("subtype_id", table, val_part, subtype_ds(table), validation_ds(val_part), eval_ds,
                                    ev, seed, 3)
                ra_rows += [{"setting": setting, "ratio": r, "seed": seed, **row, **composition(table)}
                            for row in one_vs_rest(y_eval, proba, range(3), SUBTYPE_NAMES)]
    ra_runs = pd.DataFrame(ra_rows)
    ra_table = (aggregate(ra_runs, ["setting", "ratio", "class"], ("auroc", "auprc")) if len(ra_runs)
                else pd.DataFrame())

    mal_rows = []
    if "malignancy" in experiments:
        def labelled(table: Any) -> Any:  # the nodules with a malignancy label (score 3 left out), in "malignant"
            lab = [malignancy_label(s) for s in table["malignancy"]]
            keep = [i for i, v in enumerate(lab) if v is not None]
            return table.iloc[keep].reset_index(drop=True).assign(malignant=[lab[i] for i in keep])

        def malignancy_ds(table: Any) -> Any:
            check_no_leak(table, pools.heldout, held)
            return LabelView(ItemDataset(cfg, table, "crop", size), table["malignant"].astype(int).tolist())

        mtrain, mev = labelled(pools.train), labelled(ev)
        ytr, yev = mtrain["malignant"].tolist(), mev["malignant"].tolist()
        if len(set(ytr)) < 2 or len(set(yev)) < 2:
            raise ValueError(f"malignancy needs benign (1-2) and malignant (4-5) nodules in train and evaluation; "
                             f"got train {sorted(set(ytr))}, evaluation {sorted(set(yev))}")
        mev_ds = ItemDataset(cfg, mev, "crop", size)
        for seed in seeds(cfg, n_runs):  # the paper's three arms (the balanced one only with a synthetic pool)
            split_seed, fold = run_fold(cfg, seed)
            fit_part, val_part = validation_split(mtrain, val_fraction, split_seed, "malignant", fold=fold)
            mds, mval = malignancy_ds(fit_part), (malignancy_ds(val_part) if len(val_part) else None)
            arms = [("scratch", None)] + [(f"subtype ({name})", sub_models[(name, seed)])
                                          for name in ["real", *balanced] if (name, seed) in sub_models]
            trainings.plan(len(arms))
            for init_name, init in arms:
                model, proba = classify("malignant", fit_part, val_part, mds, mval, mev_ds, mev, seed, 2, init)
                curves[("malignancy", init_name, seed)] = (np.asarray(yev), proba)
                r = one_vs_rest(yev, proba, [1], MALIGNANCY_NAMES)[0]
                mal_rows.append({"init": init_name, "seed": seed, "auroc": r["auroc"], "auprc": r["auprc"],
                                 "best_step": model.best_step, "n_train": len(fit_part), "n_val": len(val_part),
                                 "n_eval": len(mev), "n_pos_eval": r["n_pos"]})
    mal_runs = pd.DataFrame(mal_rows)
    mal_table = pd.DataFrame()
    if len(mal_runs):
        mal_table = malignancy_table(mal_runs)
    trainings.close()
    res = ClsResult(sub_runs, sub_table, sc_runs, sc_table, mal_runs, mal_table, curves, pd.DataFrame(comp_rows),
                    [str(p) for p in pools.synthetic_paths], round(time.perf_counter() - t0, 2), ra_runs, ra_table,
                    trainings_reused=trainings.reused)
    if out is not None:
        _save(cfg, res, Path(out), pools.real_root)
    return res


def _save(cfg: Any, res: ClsResult, out: Path, real_root: Path) -> None:
    from lungsynth.downstream.common import save_result

    names = ("subtype_runs", "subtype_table", "scarcity_runs", "scarcity_table", "malignancy_runs",
             "malignancy_table", "composition", "ratio_runs", "ratio_table")
    save_result(cfg, out, "lungsynth downstream cls", {n: getattr(res, n) for n in names},
                real_root=real_root, synthetic=res.synthetic, seconds=res.seconds)


def plot_pr_curves(res: ClsResult, experiment: str = "subtype", ax: Any = None) -> Any:
    """Precision-recall curves of the first run of each setting: per subtype (subtype) or malignant (malignancy)."""
    import matplotlib.pyplot as plt

    from lungsynth.downstream.metrics import pr_curve

    keys = [k for k in res.curves if k[0] == experiment]
    firsts = {}
    for k in keys:
        firsts.setdefault(k[1], k)
    classes = list(SUBTYPE_NAMES.items()) if experiment == "subtype" else [(1, MALIGNANCY_NAMES[1])]
    if ax is None:
        _, ax = plt.subplots(1, len(classes), figsize=(4 * len(classes), 3.4), squeeze=False)
        ax = ax[0]
    ax = np.atleast_1d(ax)
    for a, (k, name) in zip(ax, classes):
        for setting, key in firsts.items():
            y, proba = res.curves[key]
            if (np.asarray(y) == k).any():
                p, r = pr_curve(y, proba, k)
                a.step(r, p, where="post", label=f"{setting} (seed {key[2]})")
        y0 = np.asarray(res.curves[next(iter(firsts.values()))][0]) if firsts else np.zeros(0)
        if len(y0):
            a.axhline(float((y0 == k).mean()), ls=":", c="gray", label="chance (prevalence)")
        a.set(title=name, xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.05))
        a.legend(fontsize=7)
    return ax
