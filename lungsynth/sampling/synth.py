"""``lungsynth synth``: sample a method into a synthetic dataset, batched and resumable.

Resumption: the conditions of all ``n`` samples are drawn up front from the seed, and the samples are
cut into fixed batches ``[k B, (k + 1) B)``; batch k is generated with the seed
``SeedSequence([seed, k B])``, so it is the same whether the run is fresh or resumed. A batch whose
samples all have records is skipped (nothing redone); a batch cut short by a kill is regenerated
and only its missing samples are written. The tables are rewritten after every batch, so a killed
run leaves a loadable dataset of what it finished. A dataset is resumed or extended only by the same
checkpoint weights and method settings (``META_KEYS``); otherwise a chapter's folder is sampled anew and any
other folder is refused.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lungsynth.data import fingerprint
from lungsynth.data.conditions import SOURCES
from lungsynth.data.conditions import real_root as find_root
from lungsynth.methods.base import MethodFace
from lungsynth.runtime import peak_rss_mb
from lungsynth.sampling.registry import METHODS, get_method
from lungsynth.sampling.writer import SyntheticWriter

# what makes two datasets the same: a dataset is resumed or extended only under all of these. "weights" (the
# checkpoint's digest) and "settings" (the method's config section) because a retrained model or a changed
# sampling setting at the same checkpoint path once extended a leaderboard dataset with stale samples
META_KEYS = ("method", "variant", "unit", "checkpoint", "weights", "settings", "conditions", "seed", "batch_size",
             "options")


@dataclass
class SynthResult:
    """What :func:`synthesize` did."""

    out: Path
    method: str
    n: int
    generated: int  # samples generated in this call
    skipped: int  # samples already on disk
    seconds: float
    seconds_per_sample: float | None
    peak_memory_mb: float
    records: list[dict[str, Any]] = field(default_factory=list)


def default_out(cfg: Any, method: str, conditions: str) -> Path:
    """``runs/<profile>/synthetic/<method>_<conditions>``."""
    from lungsynth import paths

    return paths.runs_dir(cfg.profile) / "synthetic" / f"{method}_{conditions}"


def sample_id(method: str, index: int) -> str:
    return f"syn-{method}-{index:05d}"


def batch_seed(seed: int, start: int) -> int:
    """The seed of the batch starting at sample ``start`` (independent of how the run was cut)."""
    return int(np.random.SeedSequence([int(seed), int(start)]).generate_state(1)[0])


def _peak_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def _meta_diff(out: Path, meta: dict[str, Any]) -> list[str]:
    """The META_KEYS on which the dataset at ``out`` (if any) differs from ``meta`` (a key it lacks differs)."""
    import json

    path = out / "synth.json"
    if not path.is_file():
        return []
    old = json.loads(path.read_text())
    return [k for k in META_KEYS if json.loads(json.dumps(old.get(k))) != json.loads(json.dumps(meta[k]))]


def _check_meta(out: Path, meta: dict[str, Any], managed: bool) -> None:
    """Refuse to mix samples of other settings into ``out``; a ``managed`` folder (under
    ``runs/<profile>/synthetic``, where the chapters keep theirs) is sampled anew instead, since only lungsynth
    writes there and its old samples belong to a model or setting that no longer exists."""
    import shutil

    diff = _meta_diff(out, meta)
    if not diff:
        return
    if not managed:
        raise ValueError(f"{out} already holds a synthetic dataset built with other settings "
                         f"({', '.join(diff)} differ); use another --out or the same settings to resume it")
    print(f"{out}: its samples were made with other settings ({', '.join(diff)} differ); sampling it anew")
    shutil.rmtree(out)
    out.mkdir(parents=True)


def _weights_digest(checkpoint: Path) -> str | None:
    from lungsynth.gates import file_digest

    final = checkpoint / "final.pt"
    return file_digest(final) if final.is_file() else None


def _check_stamp(out: Path, value: dict[str, Any]) -> None:
    had = fingerprint.read_stamp(out)
    if had is not None and had["id"] != value["id"]:
        raise fingerprint.DataMismatch(
            f"{out} holds samples made from prepared data {had['id']} ({had.get('prepared')}), not {value['id']} "
            f"({value['prepared']}); the splits changed since. Use another --out, or delete {out} to rebuild it")


def synthesize(cfg: Any, method: str | MethodFace, n: int | None = None, *, conditions: str = "heldout",
               out: Path | str | None = None, checkpoint: Path | str | None = None, batch_size: int | None = None,
               seed: int | None = None, train_missing: bool = False, real_root: Path | str | None = None,
               progress: bool = True, model: Any = None) -> SynthResult:
    """Generate ``n`` samples of ``method`` into a synthetic dataset (see :mod:`lungsynth.sampling.writer`).

    Args:
        method: a name in ``METHODS`` or an adapter.
        n: samples (default ``cfg.sampling.n_samples``); a later call with a larger n extends the dataset.
        conditions: ``heldout`` (real test-split masks), ``sampler`` (the method's condition sampler) or
            ``validation`` (the validation split's masks, a cohort no model trains on).
        out: dataset folder (default :func:`default_out`).
        checkpoint: the run directory (or checkpoint file's folder); default the method's trained run.
        train_missing: train the default run first when it has no final checkpoint.
        real_root: the real prepared dataset the conditions come from (default the profile's).
        model: an already loaded model (skips loading; notebooks reuse one).
    Returns:
        :class:`SynthResult`; time per sample covers generation and writing, not loading.
    """
    from filelock import FileLock
    from tqdm.auto import tqdm

    from lungsynth.runtime import jsonable, write_json_atomic

    adapter = method if isinstance(method, MethodFace) else get_method(method)
    n = int(n if n is not None else cfg.sampling.n_samples)
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if conditions not in SOURCES:
        raise ValueError(f"--conditions must be one of {', '.join(SOURCES)}, got {conditions!r}")
    bs = int(batch_size or cfg.sampling.batch_size)
    if bs < 1:
        raise ValueError(f"batch size must be >= 1, got {bs}")
    seed = int(cfg.seed if seed is None else seed)
    if checkpoint is None:
        if train_missing:
            checkpoint = adapter.ensure_trained(cfg)
        else:
            checkpoint = adapter.run_dir(cfg)
            if not adapter.is_trained(cfg, checkpoint) and model is None:
                raise FileNotFoundError(f"{checkpoint} has no final.pt: train {adapter.name} first (chapter "
                                        f"{adapter.chapter}) or pass --train / --checkpoint DIR")
    checkpoint = Path(checkpoint)
    if checkpoint.is_file():
        checkpoint = checkpoint.parent
    if model is None and not checkpoint.exists():
        raise FileNotFoundError(f"checkpoint {checkpoint} not found; pass the method's run directory")
    out = Path(out) if out is not None else default_out(cfg, adapter.name, conditions)
    managed = default_out(cfg, adapter.name, conditions).parent.resolve() in out.resolve().parents
    real = find_root(cfg, real_root)
    data_stamp = fingerprint.derived_stamp(checkpoint, real)
    section = getattr(cfg, adapter.name, None)
    meta = {"method": adapter.name, "variant": adapter.variant, "unit": adapter.unit,
            "checkpoint": str(checkpoint), "weights": _weights_digest(checkpoint),
            "settings": jsonable(section),
            "conditions": conditions, "seed": seed, "batch_size": bs, "options": dict(adapter.options)}
    out.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):  # a second process writing the same dataset waits, then resumes it
        _check_meta(out, meta, managed)
        _check_stamp(out, data_stamp)
        fingerprint.write_stamp(out, data_stamp)
        write_json_atomic(out / "synth.json", {**meta, "n": n, "profile": cfg.profile, "config": cfg,
                                               "method_info": adapter.describe()})
        writer = SyntheticWriter(out, adapter.unit, adapter.spacing_mm(cfg))
        ids = [sample_id(adapter.name, i) for i in range(n)]
        todo = [s for s in range(0, n, bs) if not all(writer.done(i) for i in ids[s:s + bs])]
        skipped = sum(writer.done(i) for i in ids)
        generated = 0
        t_gen = 0.0
        t0 = time.perf_counter()
        if todo:
            conds = adapter.conditions(cfg, conditions, n, seed, real)
            if model is None:
                model = adapter.load(cfg, checkpoint)
            bar = tqdm(total=n, initial=skipped, desc=f"synth {adapter.name}", disable=not progress, unit="sample")
            for start in todo:
                batch = conds[start:start + bs]
                bseed = batch_seed(seed, start)
                tb = time.perf_counter()
                samples = adapter.generate(cfg, model, batch, bseed)
                if len(samples) != len(batch):
                    raise ValueError(f"{adapter.name}: {len(samples)} samples for a batch of {len(batch)} conditions")
                per = (time.perf_counter() - tb) / len(batch)
                for pos, (c, s) in enumerate(zip(batch, samples)):
                    sid = ids[start + pos]
                    if writer.done(sid):
                        continue
                    writer.write(sid, c, s, {"sample_id": sid, "index": start + pos, "method": adapter.name,
                                             "variant": adapter.variant, "checkpoint": str(checkpoint), "seed": seed,
                                             "batch_seed": bseed, "position": pos, "seconds": round(per, 4),
                                             "peak_memory_mb": round(_peak_mb(), 1)})
                    generated += 1
                    bar.update(1)
                t_gen += time.perf_counter() - tb
                writer.write_tables()
            bar.close()
        writer.write_tables()
        records = writer.records()
        secs = [r["seconds"] for r in records if r.get("seconds") is not None]
        return SynthResult(out, adapter.name, n, generated, skipped, round(time.perf_counter() - t0, 3),
                           float(np.mean(secs)) if secs else None,
                           max([float(r.get("peak_memory_mb") or 0.0) for r in records] + [0.0]), records)


# --------------------------------------------------------------------------- CLI


def register(sub: argparse._SubParsersAction) -> None:
    """``lungsynth synth --method M --n N --conditions heldout|sampler|validation --out D``."""
    from lungsynth.config import add_profile_argument

    p = sub.add_parser("synth", help="chapter 08: sample a method into a synthetic dataset (resumable)")
    p.add_argument("--method", required=True, choices=sorted(METHODS), help="which method")
    p.add_argument("--checkpoint", default=None, help="run directory (default: the method's trained run)")
    p.add_argument("--n", type=int, default=None, help="samples (default cfg.sampling.n_samples)")
    p.add_argument("--conditions", choices=SOURCES, default="heldout",
                   help="heldout: real test-split masks; sampler: the method's condition sampler; validation: "
                        "the validation split's masks (a cohort no model trains on)")
    p.add_argument("--out", default=None, help="dataset folder (default runs/<profile>/synthetic/<method>_<cond>)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--train", action="store_true", help="train the method first when it has no final checkpoint")
    p.add_argument("--no-progress", action="store_true")
    add_profile_argument(p)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from lungsynth.config import get_config, parse_overrides

    cfg = get_config(args.profile, parse_overrides(args.overrides))
    res = synthesize(cfg, args.method, args.n, conditions=args.conditions, out=args.out, checkpoint=args.checkpoint,
                     batch_size=args.batch_size, seed=args.seed, train_missing=args.train,
                     progress=not args.no_progress)
    per = f"{res.seconds_per_sample:.2f} s/sample" if res.seconds_per_sample is not None else "-"
    print(f"{res.out}: {res.n} samples ({res.generated} generated, {res.skipped} already there), {per}, "
          f"peak {res.peak_memory_mb:.0f} MB")
    return 0
