"""Training sets of real and synthetic items: ratios, scarcity subsets, class balancing, and the leak guard.

All functions work on item tables (:mod:`lungsynth.downstream.data`) and are deterministic given ``seed``.

Definitions used in chapters 10-11:

- **Synthetic ratio** r: the training set is the whole real train set (n_real items) plus
  ``r * n_real`` synthetic items (rounded half up). r = 0 is real only, r = 1 adds as many synthetic items as there are
  real ones (synthetic share of the mix r / (1 + r), 50% at r = 1).
- **Scarcity** (fraction f of the real data, nested: the 10% subset lies inside the 20% one, and so on):
  ``"proportional"`` adds the same fraction f of the synthetic pool (the real:synthetic proportion of the
  full sets is kept; at f = 0 the set is empty and that cell is skipped), ``"full"`` adds the whole synthetic
  pool whatever f is (at f = 0: synthetic only).
- **Cohort arms** (Lung-DDPM's Table III): the real train set plus the real items of a separate cohort of k
  patients (``"+ real"``), against the real train set plus k synthetic items generated from that cohort's
  layouts (``"+ synthetic"``): the same count, so real and synthetic additions compare one for one.
- **Balancing**: every class with fewer real items than the largest class receives synthetic items of that
  class until it reaches the largest class's count (or the synthetic pool of that class runs out).

:func:`check_no_leak` refuses a training table in which a held-out (test) patient appears, as a real item
or as the real scan whose masks conditioned a synthetic item (``provenance.csv``).
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Sequence

import numpy as np

SCARCITY_MODES: tuple[str, ...] = ("proportional", "full")


def _concat(parts: Sequence[Any]) -> Any:
    import pandas as pd

    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame()
    return pd.concat(parts, ignore_index=True)


def _draw(pool: Any, n: int, seed: int, allow_repeats: bool, what: str) -> Any:
    """``n`` rows of ``pool`` without replacement (a seeded permutation prefix); with repeats when allowed."""
    n = int(n)
    if n <= 0:
        return pool.iloc[:0]
    if n > len(pool):
        if not allow_repeats or len(pool) == 0:
            raise ValueError(f"{what}: {n} synthetic items asked but the pool holds {len(pool)}; synthesize more "
                             f"(`lungsynth synth --n {n}`) or allow repeats (cfg.downstream.allow_repeats)")
        reps = -(-n // len(pool))
        order = np.concatenate([np.random.default_rng([seed, k]).permutation(len(pool)) for k in range(reps)])[:n]
        return pool.iloc[order]
    return pool.iloc[np.random.default_rng(seed).permutation(len(pool))[:n]]


def _half_up(x: float) -> int:
    """Round half up (Python's ``round`` rounds half to even: 2.5 -> 2)."""
    return int(np.floor(x + 0.5 + 1e-9))


def synthetic_count(n_real: int, ratio: float) -> int:
    """``ratio * n_real`` rounded half up: the synthetic items added at ``ratio`` (see the module docstring)."""
    if ratio < 0:
        raise ValueError(f"synthetic ratio must be >= 0, got {ratio}")
    return _half_up(float(ratio) * int(n_real))


def mix_ratio(real: Any, synthetic: Any, ratio: float, seed: int = 0, allow_repeats: bool = False) -> Any:
    """All real items plus ``ratio * len(real)`` (rounded half up) synthetic items drawn from ``synthetic``.

    Raises ValueError when the synthetic pool is too small (unless ``allow_repeats``: then items repeat,
    each pass over the pool in a new seeded order).
    """
    n = synthetic_count(len(real), ratio)
    if n and synthetic is None:
        raise ValueError(f"ratio {ratio} asks for {n} synthetic items but no synthetic dataset was given")
    picked = _draw(synthetic, n, seed, allow_repeats, f"ratio {ratio}") if n else real.iloc[:0]
    return _concat([real, picked])


def by_generator(synthetic: Any) -> dict[str, Any]:
    """The synthetic pool split by dataset (``generator``, its folder), in first-seen order; ``{}`` for None: the
    chapters compare datasets as separate arms, never mixed."""
    if synthetic is None:
        return {}
    return {g: synthetic[synthetic["generator"] == g] for g in dict.fromkeys(synthetic["generator"])}


def cohort_arms(real: Any, cohort: Any, synthetic: Any, seed: int = 0, allow_repeats: bool = False
                ) -> dict[str, Any]:
    """``{"+ real": real + cohort, "+ synthetic": real + len(cohort) synthetic items}`` (see the module
    docstring); the synthetic items are drawn from ``synthetic`` as :func:`mix_ratio` draws them, and without a
    synthetic pool (None) only the ``"+ real"`` arm is returned."""
    if not len(cohort):
        raise ValueError("the cohort holds no items: the '+ real' arm needs the validation split's patients")
    arms = {"+ real": _concat([real, cohort.assign(synthetic=False)])}
    if synthetic is not None:
        arms["+ synthetic"] = _concat([real, _draw(synthetic, len(cohort), seed, allow_repeats, "cohort arm")])
    return arms


def validation_split(real: Any, fraction: float, seed: int = 0, stratify: str | None = None,
                     group: str = "patient_id", fold: int = 0) -> tuple[Any, Any]:
    """``(train, validation)`` of the real training items: about ``fraction`` of them held out for early stopping
    (HR-LDM §5.3's 80/20 train-validation split), whole patients at a time (two nodules of one patient never
    straddle it), balanced over the classes of ``stratify`` as far as patients allow (scikit-learn's
    ``StratifiedGroupKFold``: fold ``fold`` of ``round(1 / fraction)`` folds shuffled by ``seed``, so folds 0..k-1
    of one seed tile the patients: five-fold cross-validation). Synthetic items never enter it: the validation set
    is real only, as in the paper. ``fraction`` 0 returns ``(real, empty)``.
    """
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    if fraction == 0 or not len(real):
        return real, real.iloc[:0]
    folds = max(2, int(round(1.0 / fraction)))
    if not 0 <= int(fold) < folds:
        raise ValueError(f"fold {fold} of a {fraction:g} validation split: there are {folds} folds (0..{folds - 1})")
    groups = real[group].astype(str).to_numpy()
    if len(set(groups)) < folds:
        raise ValueError(f"a {fraction:g} validation split needs >= {folds} training patients, got "
                         f"{len(set(groups))}; prepare more scans or set downstream.val_fraction 0 (no early stopping)")
    index = np.arange(len(real))
    if stratify is not None:
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=int(seed))
        labels = real[stratify].to_numpy()
        with warnings.catch_warnings():  # a class rarer than the folds: stratified as far as it goes, as documented
            warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
            fit, val = list(splitter.split(index, labels, groups))[int(fold)]
    else:  # GroupKFold has no shuffle in every scikit-learn: shuffle the patients by relabelling them
        order = {g: k for k, g in enumerate(np.random.default_rng(seed).permutation(sorted(set(groups))))}
        fit, val = list(GroupKFold(n_splits=folds).split(index, groups=[order[g] for g in groups]))[int(fold)]
    return real.iloc[np.sort(fit)], real.iloc[np.sort(val)]


def real_subset(real: Any, fraction: float, seed: int = 0, stratify: str | None = None) -> Any:
    """A nested random subset: ``fraction * n`` items rounded half up (per class of ``stratify`` when given).

    Nested: with the same seed the subset of a smaller fraction is contained in that of a larger one.
    Stratified subsets keep at least one item of each class when ``fraction > 0``.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"real fraction must be in [0, 1], got {fraction}")
    if stratify is None:
        groups = [np.arange(len(real))]
    else:
        labels = real[stratify].to_numpy()
        groups = [np.flatnonzero(labels == v) for v in sorted(set(labels.tolist()))]
    keep = []
    for k, idx in enumerate(groups):
        perm = idx[np.random.default_rng([seed, k]).permutation(len(idx))]
        n = _half_up(fraction * len(idx))
        if stratify is not None and fraction > 0:
            n = max(n, 1)
        keep.append(perm[:n])
    sel = np.sort(np.concatenate(keep)) if keep else np.array([], dtype=int)
    return real.iloc[sel]


def scarcity_set(real: Any, synthetic: Any, fraction: float, mode: str, seed: int = 0,
                 stratify: str | None = None) -> Any:
    """The training set of one scarcity cell: ``fraction`` of the real items plus synthetic per ``mode``.

    ``mode``: ``"proportional"`` (the same fraction of the synthetic pool, nested as well) or ``"full"`` (all
    of it); ``"real"`` adds no synthetic item. See the module docstring.
    """
    if mode not in SCARCITY_MODES + ("real",):
        raise ValueError(f"unknown scarcity mode {mode!r}; use one of {', '.join(SCARCITY_MODES)} or real")
    part = real_subset(real, fraction, seed, stratify)
    if mode == "real" or synthetic is None:
        return part
    syn = synthetic if mode == "full" else real_subset(synthetic, fraction, seed + 1,
                                                        stratify if stratify in synthetic.columns else None)
    return _concat([part, syn])


def scarcity_sets(real: Any, synthetic: Any, fractions: Iterable[float], seed: int = 0,
                  stratify: str | None = None, modes: Sequence[str] = SCARCITY_MODES) -> dict[tuple[float, str], Any]:
    """``{(fraction, mode): table}`` for every fraction and mode; empty cells (0% real, proportional) are left out."""
    out = {}
    for f in fractions:
        for mode in modes:
            t = scarcity_set(real, synthetic, float(f), mode, seed, stratify)
            if len(t):
                out[(float(f), mode)] = t
    return out


def balance_classes(real: Any, synthetic: Any, label: str = "subtype_id", seed: int = 0,
                    classes: Sequence[int] | None = None, allow_repeats: bool = False) -> tuple[Any, dict[int, dict]]:
    """Add synthetic items of each minority class until it matches the largest real class.

    Args:
        label: the class column (present in both tables).
        classes: the valid class values (default: those of ``real``); a synthetic label outside them is an error.
        allow_repeats: when a class's synthetic pool is smaller than its deficit, repeat items (else add what
            there is).
    Returns:
        the mixed table and ``{class: {"real", "synthetic_added", "synthetic_available", "total"}}``.
    """
    valid = sorted(set(int(v) for v in (classes if classes is not None else real[label].unique())))
    if synthetic is not None and len(synthetic):
        unknown = sorted(set(int(v) for v in synthetic[label].unique()) - set(valid))
        if unknown:
            raise ValueError(f"synthetic items have unknown {label} values {unknown}; valid: {valid}")
    counts = {c: int((real[label] == c).sum()) for c in valid}
    target = max(counts.values()) if counts else 0
    parts, report = [real], {}
    for k, c in enumerate(valid):
        pool = synthetic[synthetic[label] == c] if synthetic is not None else real.iloc[:0]
        need = target - counts[c]
        n = need if allow_repeats and len(pool) else min(need, len(pool))
        picked = _draw(pool, n, seed + k, allow_repeats, f"balancing class {c}") if n > 0 else pool.iloc[:0]
        parts.append(picked)
        report[c] = {"real": counts[c], "synthetic_added": int(len(picked)), "synthetic_available": int(len(pool)),
                     "total": counts[c] + int(len(picked))}
    return _concat(parts), report


def check_no_leak(train: Any, heldout: Iterable[str], heldout_splits: Sequence[str] = ("test",),
                  what: str = "training set") -> None:
    """Raise ValueError when a held-out patient is in ``train``: as a real item (``patient_id``) or as the
    condition of a synthetic item (``condition_patient``, or a ``condition_split`` in ``heldout_splits``).

    The message names the patients and the offending synthetic samples.
    """
    heldout = {str(p) for p in heldout}
    if not len(train):
        return
    synthetic = train["synthetic"].astype(bool).to_numpy() if "synthetic" in train.columns else np.zeros(len(train), bool)
    real_ids = train.loc[~synthetic, "patient_id"].astype(str)
    real_leak = sorted(set(real_ids) & heldout)
    syn = train.loc[synthetic]
    cond_pat = syn["condition_patient"] if "condition_patient" in syn.columns else None
    cond_split = syn["condition_split"] if "condition_split" in syn.columns else None
    bad_rows = np.zeros(len(syn), bool)
    if cond_pat is not None:
        bad_rows |= cond_pat.astype(str).isin(heldout).to_numpy()
    if cond_split is not None:
        bad_rows |= cond_split.astype(str).isin(list(heldout_splits)).to_numpy()
    syn_bad = syn[bad_rows]
    if not real_leak and not len(syn_bad):
        return
    msg = []
    if real_leak:
        msg.append(f"real items of held-out patients {', '.join(real_leak)}")
    if len(syn_bad):
        pats = sorted({str(p) for p in syn_bad.get("condition_patient", []) if isinstance(p, str)})
        samples = ", ".join(syn_bad["item_id"].astype(str).head(5)) + (" ..." if len(syn_bad) > 5 else "")
        splits = sorted(set(syn_bad["condition_split"].astype(str))) if "condition_split" in syn_bad.columns else []
        msg.append(f"{len(syn_bad)} synthetic items conditioned on held-out patients {', '.join(pats) or '?'} "
                   f"(condition split {', '.join(splits) or '?'}; samples {samples})")
    if len(syn_bad):
        msg.append("fix: synthesize with --conditions sampler (training masks), not heldout")
    if real_leak:
        msg.append("fix: train on the train split only; these patients are scored (test or downstream.eval_splits)")
    raise ValueError(f"test-patient leak in the {what}: " + "; ".join(msg))


def check_cohort(synthetic: Any, train: Any, cohort: Any, what: str = "synthetic pool") -> None:
    """Raise ValueError unless every synthetic item was conditioned on a patient of ``cohort`` (real items of the
    cohort split), none on a patient of ``train``: Lung-DDPM generates its downstream volumes from a separate cohort
    (Table I), so a synthetic volume never re-renders the layout of a scan the segmenter trains on.

    The message names the offending samples and their condition patients.
    """
    cond = synthetic["condition_patient"].astype(str) if "condition_patient" in synthetic.columns else None
    if cond is None:
        raise ValueError(f"the {what} has no condition_patient column: its provenance cannot show its cohort")
    allowed = set(cohort["patient_id"].astype(str))
    bad = synthetic[~cond.isin(allowed).to_numpy()]
    if not len(bad):
        return
    trained = sorted(set(bad["condition_patient"].astype(str)) & set(train["patient_id"].astype(str)))
    samples = ", ".join(bad["item_id"].astype(str).head(5)) + (" ..." if len(bad) > 5 else "")
    where = f"training patients {', '.join(trained)}" if trained else "patients outside the cohort"
    raise ValueError(f"{len(bad)} items of the {what} were conditioned on {where} (samples {samples}); the cohort "
                     f"is {len(allowed)} validation patients. fix: synthesize with --conditions validation, or set "
                     f"downstream.seg_condition_source=sampler to mix training layouts knowingly")


def composition(table: Any, label: str | None = None) -> dict[str, Any]:
    """Counts of a training table: ``n, n_real, n_synthetic, synthetic_share`` (and per class of ``label``)."""
    syn = int(table["synthetic"].astype(bool).sum()) if len(table) else 0
    out: dict[str, Any] = {"n": int(len(table)), "n_real": int(len(table)) - syn, "n_synthetic": syn,
                           "synthetic_share": syn / len(table) if len(table) else float("nan")}
    if label is not None and len(table):
        for c, n in table[label].value_counts().sort_index().items():
            out[f"n_{label}_{c}"] = int(n)
    return out
