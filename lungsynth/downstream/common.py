"""What chapters 10 and 11 share: the real/synthetic pools, the held-out patients, training through the engine,
and the default synthetic dataset of the chapters."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from lungsynth.data import fingerprint


@dataclass
class Pools:
    """Item tables of one task: real train items, real evaluation items, the synthetic pool and who is held out."""

    real_root: Path
    train: Any
    evaluation: Any
    synthetic: Any  # None when no synthetic dataset was given
    heldout: set[str]
    synthetic_paths: list[Path]
    cohort: Any = None  # real items of the cohort split (chapter 10's "+ real" arm); None without a cohort


def cohort_split(cfg: Any) -> str | None:
    """The split whose patients condition chapter 10's synthetic volumes and form its "+ real" arm
    (``cfg.downstream.seg_condition_source``): "val" for ``validation``, None for ``sampler`` (training layouts).

    Raises:
        ValueError: an unknown source, or a cohort the evaluation also scores (``downstream.eval_splits``).
    """
    from lungsynth.data.conditions import SOURCE_SPLITS

    source = str(cfg.downstream.seg_condition_source)
    if source not in ("validation", "sampler"):
        raise ValueError(f"downstream.seg_condition_source {source!r}: use validation (a separate cohort, Lung-DDPM's "
                         f"Table I) or sampler (the training patients' layouts)")
    if source == "sampler":
        return None
    split = SOURCE_SPLITS[source]
    if split in tuple(cfg.downstream.eval_splits):
        raise ValueError(f"downstream.seg_condition_source=validation draws the {split!r} patients, but "
                         f"downstream.eval_splits {tuple(cfg.downstream.eval_splits)} scores them: set "
                         f"downstream.eval_splits=test or downstream.seg_condition_source=sampler")
    return split


def as_paths(synthetic: str | Path | Sequence[str | Path] | None) -> list[Path]:
    """``"D1,D2"``, a path or a list of them -> list of Paths (empty for None / "")."""
    if synthetic is None or synthetic == "":
        return []
    if isinstance(synthetic, (str, Path)):
        return [Path(s.strip()) for s in str(synthetic).split(",") if s.strip()]
    return [Path(s) for s in synthetic]


def load_pools(cfg: Any, unit: str, synthetic: Any = None, real_root: Path | str | None = None,
               cohort: str | None = None) -> Pools:
    """Real train / evaluation items (``cfg.downstream.eval_splits``) and the synthetic pool of ``unit`` items.

    The held-out patients are those of the test split and of the evaluation splits; the synthetic pool is
    checked against them (:func:`lungsynth.downstream.mixing.check_no_leak`) before any training. With a
    ``cohort`` split (:func:`cohort_split`), its real items are loaded as ``Pools.cohort`` and every synthetic item
    must be conditioned on one of its patients (:func:`lungsynth.downstream.mixing.check_cohort`). With a synthetic
    pool of nodules, every crop (real and synthetic, train, cohort and evaluation) is cut from its volume at the
    coarsest volume spacing among them (:func:`lungsynth.downstream.data.same_resolution`).
    """
    import pandas as pd

    from lungsynth.data.datasets import ensure_prepared
    from lungsynth.downstream.data import heldout_patients, real_items, same_resolution, synthetic_items
    from lungsynth.downstream.mixing import check_cohort, check_no_leak

    root = Path(real_root) if real_root is not None else ensure_prepared(cfg, verbose=False)
    splits = tuple(cfg.downstream.eval_splits)
    if "train" in splits:
        raise ValueError(f"downstream.eval_splits {splits} must not contain the train split")
    if cohort is not None and cohort in ("train", "test") + splits:
        raise ValueError(f"the cohort split {cohort!r} must be neither trained on nor scored (train, test, "
                         f"downstream.eval_splits {splits})")
    held = heldout_patients(root, ("test",) + splits)
    train = real_items(root, unit, ("train",))
    evaluation = real_items(root, unit, splits)
    if not len(evaluation):
        raise ValueError(f"the evaluation splits {splits} of {root} hold no {unit} items; prepare more scans "
                         f"or set downstream.eval_splits")
    paths = as_paths(synthetic)
    syn = pd.concat([synthetic_items(p, unit, root) for p in paths], ignore_index=True) if paths else None
    check_no_leak(train, held, ("test",) + splits, what="real train split")
    if syn is not None:
        check_no_leak(syn, held, ("test",) + splits, what=f"synthetic pool ({', '.join(map(str, paths))})")
    for p in paths:  # nor may the generator of a synthetic pool have trained on a scored patient
        fingerprint.refuse_overlap(p, root, ("test",) + splits, what=f"generator of the synthetic pool {p}")
    extra = real_items(root, unit, (cohort,)) if cohort is not None else None
    if syn is not None and extra is not None:
        check_cohort(syn, train, extra, what=f"synthetic pool ({', '.join(map(str, paths))})")
    if unit == "nodule" and syn is not None:  # real and synthetic crops at one resolution, the real-only arm too
        if extra is not None:
            train, evaluation, syn, extra = same_resolution(train, evaluation, syn, extra)
        else:
            train, evaluation, syn = same_resolution(train, evaluation, syn)
    return Pools(root, train, evaluation, syn, held, paths, extra)


def fit(cfg: Any, model: Any, loss_fn: Callable[[Any, Any], Any], dataset: Any, steps: int, batch_size: int,
        seed: int, kind: str, validation: Any = None, val_fn: Callable[[Any, Any], Any] | None = None,
        val_every: int = 0, patience: int = 0) -> Any:
    """Train ``model`` in place through :class:`lungsynth.engine.Trainer` (in memory, no checkpoints).

    With a ``validation`` dataset, ``val_fn(model, batch) -> {"loss": float}`` is measured every ``val_every``
    steps, the fit stops after ``patience`` validations without a lower loss (0: never), and the model returned
    holds the weights of the lowest validation loss (early stopping; ``model.best_step`` says which step).
    """
    from lungsynth.engine import SimpleTask, Trainer

    watch = validation is not None and len(validation) > 0 and val_fn is not None and int(val_every) > 0
    trainer = Trainer.from_config(cfg.engine, None, max_steps=int(steps), batch_size=min(int(batch_size), len(dataset)),
                                  lr=float(cfg.downstream.lr), seed=int(seed), progress=False,
                                  checkpoint_every=None, num_workers=0, schedule="cosine",
                                  val_every=int(val_every) if watch else None, keep_best="val_loss" if watch else None,
                                  patience=int(patience) if watch else None)
    import torch

    # Subnormal floats can slow CPU convolutions several-fold in these tiny, short runs; flush them to zero
    # while training (torch's default, off, is restored afterwards).
    torch.set_flush_denormal(True)
    try:
        result = trainer.fit(SimpleTask(model, loss_fn, kind=kind, val_fn=val_fn if watch else None), dataset,
                             val_data=validation if watch else None)
    finally:
        torch.set_flush_denormal(False)
    best = trainer.restore_best()
    model.best_step = best["step"] if best is not None else result.steps
    return model.eval()


def random_flip(x: Any, *others: Any) -> tuple[Any, ...]:
    """Flip [B, C, D, H, W] tensors along each spatial axis with probability 1/2 (torch RNG; the same flips for
    all tensors) — the only augmentation of the downstream models."""
    import torch

    dims = [d for d in (2, 3, 4) if bool(torch.rand(()) < 0.5)]
    if not dims:
        return (x,) + others
    return tuple(t.flip(dims) for t in (x,) + others)


def synthetic_needed(cfg: Any, unit: str, real_root: Path | str | None = None) -> int:
    """Synthetic ``unit`` items the ratio experiments draw at most: ``max(cfg.downstream.synthetic_ratios)``
    times the real training items, rounded half up as :func:`lungsynth.downstream.mixing.mix_ratio` does."""
    from lungsynth.data.datasets import ensure_prepared
    from lungsynth.downstream.data import real_items
    from lungsynth.downstream.mixing import synthetic_count

    root = Path(real_root) if real_root is not None else ensure_prepared(cfg, verbose=False)
    ratio = max([float(r) for r in cfg.downstream.synthetic_ratios] + [0.0])
    return synthetic_count(len(real_items(root, unit, ("train",))), ratio)


# The generator each paper asks its downstream question of (issue 23): Lung-DDPM segments nodules in its
# synthetic volumes (Table III, chapter 10), HR-LDM classifies subtypes of its inpainted nodules (Sec. 6, chapter 11).
PAPER_GENERATOR = {"volume": "lung_ddpm", "nodule": "hr_ldm"}


def balancing_deficits(real: Any, label: str = "subtype_id", classes: Sequence[int] = (0, 1, 2)) -> tuple[int, ...]:
    """Per class of ``classes``, the items that bring it to the largest class of ``real`` (a table with a
    ``label`` column): HR-LDM (Sec. 6.3) tops the minority subtypes up to the solid count."""
    counts = [int((real[label] == c).sum()) for c in classes]
    return tuple(max(counts) - n for n in counts)


def sized_train(cfg: Any, real_root: Path | str) -> Any:
    """The real training nodules chapter 11 reads: those of ``cfg.downstream.cls_size_range_mm`` (6-30 mm)."""
    from lungsynth.downstream.data import in_size_range, real_items

    real = real_items(real_root, "nodule", ("train",))
    return real[in_size_range(real, cfg.downstream.cls_size_range_mm)].reset_index(drop=True)


def ensure_synthetic(cfg: Any, method: Any = None, n: int | None = None, out: Path | str | None = None,
                     progress: bool = False, unit: str = "volume", real_root: Path | str | None = None,
                     max_rounds: int = 4, **synth_options: Any) -> Path:
    """The chapters' synthetic dataset of ``method``, large enough for the chapter's experiments. Nodules (chapter
    11) are conditioned on *training* masks (``conditions="sampler"``: HR-LDM inpaints into the training scans),
    under ``runs/<profile>/synthetic/downstream_<method>``; volumes (chapter 10) on the layouts of
    ``cfg.downstream.seg_condition_source`` (``validation``: the separate cohort of :func:`cohort_split`, under
    ``downstream_<method>_validation``; ``sampler``: training layouts).

    ``n`` volumes when given; else at least ``cfg.downstream.n_synthetic`` and, unless
    ``cfg.downstream.allow_repeats``, enough items for the largest synthetic ratio (:func:`pool_needs`: for
    chapter 10 volumes and / or their nodules, as its ``seg_settings`` ask). The volume count that holds enough
    nodule rows is not known before sampling: the dataset is extended (resuming, never redone) by the deficit over
    the measured rows per volume, at most ``max_rounds`` times. The default nodule pool is HR-LDM's, generated to what
    balancing the real 6-30 mm training nodules (:func:`sized_train`) needs of each subtype
    (:func:`balancing_deficits`; one inpainted nodule per volume, from the 6-30 mm shapes of
    ``hr_ldm.size_range_mm``) rather than to the largest ratio.

    ``method`` defaults to the paper's own generator of the ``unit``'s question (:data:`PAPER_GENERATOR`:
    Lung-DDPM for volumes, HR-LDM for nodules), trained on demand through its ``ensure_trained`` (chapters 06,
    05) when it is not. Smoke cost measured on a busy 2-core machine: 4 Lung-DDPM samples in 50-120 s.
    ``synth_options`` go to :func:`lungsynth.sampling.synth.synthesize` (``checkpoint``, ``model``).
    """
    from lungsynth import paths
    from lungsynth.data.datasets import ensure_prepared
    from lungsynth.downstream.data import synthetic_items
    from lungsynth.sampling.registry import get_method
    from lungsynth.sampling.synth import synthesize

    if unit not in PAPER_GENERATOR:
        raise ValueError(f"unit {unit!r}: the downstream chapters use {' or '.join(PAPER_GENERATOR)}")
    root = Path(real_root) if real_root is not None else ensure_prepared(cfg, verbose=False)
    planned = None
    if method is None:
        method = get_method(PAPER_GENERATOR[unit])
        deficits = balancing_deficits(sized_train(cfg, root)) if unit == "nodule" else ()
        if sum(deficits):  # nodules: HR-LDM inpaints what each subtype lacks
            method, planned = method.with_options(subtype_counts=deficits), sum(deficits)
    name = getattr(method, "name", method)
    source = str(cfg.downstream.seg_condition_source) if unit == "volume" and cohort_split(cfg) else "sampler"
    folder = f"downstream_{name}" + ("" if source == "sampler" else f"_{source}")
    out = Path(out) if out is not None else paths.runs_dir(cfg.profile) / "synthetic" / folder
    options = {"conditions": source, "out": out, "real_root": root, "progress": progress,
               "train_missing": "checkpoint" not in synth_options, **synth_options}
    if n is not None:
        synthesize(cfg, method, int(n), **options)
        return out
    needs = pool_needs(cfg, unit, root, planned)
    volumes = max(int(cfg.downstream.n_synthetic), needs.get("volume", 0), planned or (1 if unit == "nodule" else 0))
    for _ in range(max_rounds):
        synthesize(cfg, method, volumes, **options)
        have = {u: len(synthetic_items(out, u, root)) for u in needs}
        short = {u: n - have[u] for u, n in needs.items() if have[u] < n}
        if not short:
            break
        volumes += max(int(np.ceil(d / (max(have[u], 1) / volumes))) for u, d in short.items())
    return out


def pool_needs(cfg: Any, unit: str, real_root: Path, planned: int | None = None) -> dict[str, int]:
    """The items, by unit, a synthetic pool of ``unit`` must hold for the chapter's largest ratio: chapter 10's
    volumes for its ``volume`` setting and their nodules for its ``crop`` setting (a synthetic volume from the
    validation cohort holds ~3 nodules against ~4 in a training scan: course, 188 in 60 volumes for 251 real),
    chapter 11's nodules, or HR-LDM's ``planned`` count. Empty where items may repeat (smoke)."""
    if cfg.downstream.allow_repeats:
        return {}
    if planned:
        return {"nodule": int(planned)}
    if unit == "nodule":
        return {"nodule": synthetic_needed(cfg, "nodule", real_root)}
    settings = set(cfg.downstream.seg_settings)
    return {u: synthetic_needed(cfg, u, real_root) for u, setting in (("volume", "volume"), ("nodule", "crop"))
            if setting in settings}


def seeds(cfg: Any, n: int | None = None) -> list[int]:
    """The seeds of the independent runs: ``cfg.seed + k`` for k < ``n`` (default ``cfg.downstream.n_runs``)."""
    return [int(cfg.seed) + k for k in range(int(n or cfg.downstream.n_runs))]


def finite_mean(values: Sequence[float]) -> float:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else float("nan")


def save_result(cfg: Any, out: Path, command: str, tables: dict[str, Any], real_root: Path | str | None = None,
                **record: Any) -> None:
    """Write each table as ``out/<name>.csv``, a run.json (config, seed, ``record`` entries) and, with
    ``real_root``, the data stamp of the real data the models trained and were scored on."""
    from lungsynth.runtime import RunRecord

    out.mkdir(parents=True, exist_ok=True)
    if real_root is not None:
        fingerprint.write_stamp(out, fingerprint.stamp(real_root))
    with RunRecord(out, config=cfg, seed=cfg.seed, command=command) as rec:
        for name, df in tables.items():
            df.to_csv(out / f"{name}.csv", index=False)
        for key, value in record.items():
            rec[key] = value


class Trainings:
    """The finished trainings of one downstream run, kept under ``<out>/trainings``: a killed run resumes with the
    trainings it had finished (each minutes long in ``course``), and a bar counts them.

    A training is named by a digest of everything it depends on (:meth:`key`: its experiment, seed, the training
    and validation tables, its starting weights, the whole profile, the real data's fingerprint and
    :data:`lungsynth.data.patches.CROP_VERSION`), so a changed setting, table or crop trains again. A file holds
    tensors and numbers only and is read without unpickling
    (``weights_only``); ``out=None`` keeps nothing.
    """

    def __init__(self, cfg: Any, out: Path | str | None, real_root: Path | str, desc: str,
                 progress: bool | None = None) -> None:
        import dataclasses
        import json

        from tqdm.auto import tqdm

        self.folder = Path(out) / "trainings" if out is not None else None
        from lungsynth.data.patches import CROP_VERSION

        self._context = json.dumps([dataclasses.asdict(cfg), fingerprint.read(real_root), CROP_VERSION], sort_keys=True,
                                   default=str)
        self.bar = tqdm(total=0, desc=desc, unit="training", disable=None if progress is None else not progress)
        self.reused = 0

    def plan(self, n: int) -> None:
        """``n`` more trainings to come (the bar's total)."""
        self.bar.total += int(n)
        self.bar.refresh()

    def key(self, *parts: Any) -> str:
        """The digest of ``parts`` (tables by their records, anything else by its ``str``) and the context."""
        import hashlib
        import json

        def plain(p: Any) -> Any:
            return p.to_json(orient="records") if hasattr(p, "to_json") else str(p)

        text = json.dumps([plain(p) for p in parts] + [self._context])
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored training ``key``, or None (not finished, or no folder)."""
        import torch

        path = self.folder / f"{key}.pt" if self.folder is not None else None
        if path is None or not path.exists():
            return None
        self.reused += 1
        return torch.load(path, map_location="cpu", weights_only=True)

    def put(self, key: str, **payload: Any) -> None:
        """Store the finished training ``key`` (tensors, numbers, strings, and dicts or lists of them)."""
        from lungsynth.engine import save_checkpoint

        if self.folder is not None:
            save_checkpoint(payload, self.folder / f"{key}.pt")

    def done(self) -> None:
        """One training finished or read back."""
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
