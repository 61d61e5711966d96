"""The one training loop of the course: every model (autoencoders with a GAN discriminator,
diffusion denoisers, segmenters, classifiers) trains through :class:`Trainer`.

A model describes itself as a :class:`TrainTask`: its named modules, its named optimisers and a
``training_step(batch, step)`` that returns one loss per optimiser plus numbers to log. The
engine does the rest: device placement, AdamW + LR schedule (constant, cosine, polynomial, with
warm-up), bf16 autocast where the device runs it fast (``runtime.choose_precision``), gradient
accumulation and clipping, EMA (decay, start step, update interval), atomic checkpoints that load with
``torch.load(weights_only=True)``, exact resume (the data order is part of the checkpoint),
data parallelism under ``torchrun``, a tqdm bar, a metrics CSV and validation hooks::

    task = SimpleTask(model, lambda m, b: F.mse_loss(m(b["x"]), b["y"]), kind="toy", config={"width": 8})
    result = Trainer(run_dir, max_steps=200, lr=1e-3, schedule="cosine").fit(task, dataset)
    weights = load_weights(result.final_path, kind="toy", config={"width": 8})

Loss keys: for a task with one optimiser ``training_step`` returns ``{"loss": tensor, ...}``;
with several (say ``generator`` and ``discriminator``) it returns ``{"loss_generator": ...,
"loss_discriminator": ...}``. Each loss is back-propagated into the parameters of its own
optimiser only (``backward(inputs=...)``), so a generator loss that runs through the
discriminator leaves the discriminator's gradients alone; compute the discriminator loss on
detached outputs. A loss returned as ``None`` skips that optimiser's step (a discriminator
during its warm-up); under DDP that choice must be the same on every process (let it depend on
``step`` only). Every other key is a number to log.

Checkpoint layout (``<run_dir>/last.pt``, a plain dict of tensors and Python scalars)::

    format, kind, config, step, data_position (samples consumed, all processes together),
    elapsed_s, world_size, modules {name: state_dict}, optimizers {name: state_dict},
    schedulers {name: state_dict}, ema {name: state_dict} | None, ema_settings,
    rng [per process {python, numpy, torch, cuda}], trainer {settings}

``<run_dir>/final.pt`` holds only ``format, kind, config, step, modules, ema``.

Stopping: SIGINT (Ctrl-C, a notebook's interrupt) or SIGTERM during :meth:`Trainer.fit` finishes the
current step, writes ``last.pt`` atomically, prints ``stopped at step N; run the same command to
resume`` and raises :class:`TrainingStopped` (a ``SystemExit`` with status 130). A second signal
stops at once (KeyboardInterrupt).
"""

from __future__ import annotations

import atexit
import copy
import csv
import dataclasses
import io
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from abc import ABC, abstractmethod
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from lungsynth import runtime

CHECKPOINT_FORMAT = "lungsynth-checkpoint-v1"
LAST_NAME = "last.pt"
FINAL_NAME = "final.pt"
BEST_NAME = "best.pt"
METRICS_NAME = "metrics.csv"
SETTINGS_NAME = "engine.json"
SCHEDULES = ("constant", "cosine", "polynomial")

__all__ = [
    "TrainTask", "SimpleTask", "Trainer", "FitResult", "TrainingStopped", "EMA", "InfiniteSampler", "DistInfo",
    "lr_factor", "loss_key", "init_distributed", "dist_info", "save_checkpoint", "load_checkpoint",
    "check_compatible", "load_weights", "read_metrics", "plot_metrics",
]


# --------------------------------------------------------------------------- task interface


class TrainTask(ABC):
    """What a model gives the engine.

    Attributes:
        kind: names the model family in checkpoints (``"vae3d"``, ``"lung_ddpm"``, ...);
            :func:`load_weights` refuses a checkpoint of another kind.
        device: set by the engine before :meth:`setup`; create tensors there.

    Override :meth:`modules` and :meth:`training_step`; the rest has defaults.
    """

    kind: str = "model"
    device: torch.device = torch.device("cpu")

    @abstractmethod
    def modules(self) -> dict[str, nn.Module]:
        """The named modules the engine moves to the device, trains, averages (EMA) and checkpoints.

        Frozen helpers (a perceptual network, a frozen decoder) stay out: keep them on the task and
        move them in :meth:`setup`.
        """

    def setup(self, device: torch.device) -> None:
        """Called once by the engine after the modules moved to ``device``, before the optimisers."""

    def configure_optimizers(self, lr: float, weight_decay: float) -> dict[str, torch.optim.Optimizer]:
        """Named optimisers; default: one AdamW named ``"model"`` over every trainable parameter.

        The engine's LR schedule multiplies each parameter group's own ``lr``.
        """
        params = [p for m in self.modules().values() for p in m.parameters() if p.requires_grad]
        return {"model": torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)}

    @abstractmethod
    def training_step(self, batch: Any, step: int) -> dict[str, Any]:
        """One micro-batch: ``{"loss": scalar tensor}`` (one optimiser) or ``{"loss_<optimiser>": ...}``.

        ``batch`` is what the data loader collated, already on :attr:`device`; ``step`` counts the
        optimiser steps done before this one (0-based). Runs under autocast. Other keys (floats
        or 0-d tensors) are logged.
        """

    def validation_step(self, batch: Any, step: int) -> dict[str, float] | None:
        """Numbers to log at validation, averaged over batches and processes (default: none).

        Called under ``torch.no_grad()`` with modules in eval mode, once per validation batch, or
        once with ``batch=None`` when the trainer has no validation data (sampling a figure, say).
        """
        return None

    def config(self) -> dict[str, Any]:
        """What built the weights (architecture, not budgets); stored in checkpoints and compared
        by :func:`load_weights` and on resume. Plain types only."""
        return {}

    def ema_modules(self) -> list[str]:
        """Names of the modules to keep an EMA copy of (default: all)."""
        return list(self.modules())


class SimpleTask(TrainTask):
    """One model, one loss, one optimiser.

    Args:
        model: the network.
        loss_fn: ``loss_fn(model, batch) -> loss tensor`` or ``-> {"loss": tensor, **logs}``.
        kind / config: see :class:`TrainTask`.
        val_fn: optional ``val_fn(model, batch) -> {name: float}``.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Any], kind: str = "model",
                 config: Mapping[str, Any] | None = None,
                 val_fn: Callable[[nn.Module, Any], Mapping[str, Any]] | None = None) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.kind = kind
        self._config = dict(config or {})
        self.val_fn = val_fn

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def training_step(self, batch: Any, step: int) -> dict[str, Any]:
        out = self.loss_fn(self.model, batch)
        return dict(out) if isinstance(out, Mapping) else {"loss": out}

    def validation_step(self, batch: Any, step: int) -> dict[str, float] | None:
        if self.val_fn is None or batch is None:
            return None
        return dict(self.val_fn(self.model, batch))

    def config(self) -> dict[str, Any]:
        return self._config


def loss_key(optimizer_name: str, n_optimizers: int) -> str:
    """The ``training_step`` key of an optimiser's loss: ``"loss"`` alone, else ``"loss_<name>"``."""
    return "loss" if n_optimizers == 1 else f"loss_{optimizer_name}"


# --------------------------------------------------------------------------- LR schedule


def lr_factor(step: int, schedule: str = "constant", total_steps: int = 1, warmup_steps: int = 0,
              power: float = 1.0, min_ratio: float = 0.0) -> float:
    """Multiplier of the base LR for optimiser step ``step`` (0-based).

    Warm-up: ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps. After it, with
    ``p = (step - warmup) / (total - warmup)`` clamped to [0, 1]:
    constant ``1``; cosine ``m + (1 - m) (1 + cos(pi p)) / 2``; polynomial
    ``m + (1 - m) (1 - p) ** power`` (``torch.optim.lr_scheduler.PolynomialLR`` when m = 0 and
    no warm-up), with ``m = min_ratio``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown LR schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    p = min(max((step - warmup_steps) / max(1, total_steps - warmup_steps), 0.0), 1.0)
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
    return min_ratio + (1.0 - min_ratio) * (1.0 - p) ** power


# --------------------------------------------------------------------------- EMA


class EMA:
    """Exponential moving average of named modules, as in Lung-DDPM's trainer.

    After optimiser step ``s`` (1-based count of steps done), when ``s % every == 0``:
    ``ema <- model`` while ``s < start``, else ``ema <- decay * ema + (1 - decay) * model``.
    Buffers (BatchNorm statistics) are copied. :meth:`module` gives the averaged copy for
    evaluation and sampling (Lung-DDPM: decay 0.995 from step 2000 every 10 steps).
    """

    def __init__(self, modules: Mapping[str, nn.Module], decay: float = 0.999, start: int = 0,
                 every: int = 1) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        if every < 1:
            raise ValueError(f"EMA update interval must be >= 1, got {every}")
        self.decay, self.start, self.every = float(decay), int(start), int(every)
        self.modules: dict[str, nn.Module] = {}
        for name, module in modules.items():
            shadow = copy.deepcopy(module).eval()
            shadow.requires_grad_(False)
            self.modules[name] = shadow

    def module(self, name: str) -> nn.Module:
        """The averaged copy of module ``name`` (eval mode, no gradients)."""
        return self.modules[name]

    @torch.no_grad()
    def update(self, modules: Mapping[str, nn.Module], step: int) -> bool:
        """Apply the rule above after optimiser step ``step``; returns whether anything changed."""
        if step % self.every != 0:
            return False
        copy_only = step < self.start
        for name, shadow in self.modules.items():
            src = modules[name]
            for e, p in zip(shadow.parameters(), src.parameters()):
                if copy_only or not p.dtype.is_floating_point:
                    e.copy_(p.detach())
                else:
                    e.lerp_(p.detach(), 1.0 - self.decay)
            for e, b in zip(shadow.buffers(), src.buffers()):
                e.copy_(b)
        return True

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: m.state_dict() for name, m in self.modules.items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        for name, m in self.modules.items():
            m.load_state_dict(state[name])

    def settings(self) -> dict[str, Any]:
        return {"decay": self.decay, "start": self.start, "every": self.every}


# --------------------------------------------------------------------------- data order


class InfiniteSampler(torch.utils.data.Sampler):
    """An endless, seeded stream of dataset indices that can start anywhere.

    The global stream is the concatenation of epochs, epoch ``e`` being
    ``randperm(n, seed + e)`` (or ``arange(n)`` without shuffling). Process ``rank`` of
    ``world_size`` takes global positions ``rank, rank + W, rank + 2W, ...``: one optimiser step
    of W processes with batch b sees exactly the W*b samples a single process with batch W*b
    would see. ``start`` is this process's position in its own share (what the engine stores as
    ``data_position // world_size``).
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 start: int = 0) -> None:
        if n < 1:
            raise ValueError("InfiniteSampler needs a non-empty dataset")
        self.n, self.seed, self.shuffle = int(n), int(seed), bool(shuffle)
        self.rank, self.world_size, self.start = int(rank), int(world_size), int(start)

    def _epoch(self, e: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + e))

    def __iter__(self) -> Iterator[int]:
        g = self.start * self.world_size + self.rank
        epoch, order = -1, torch.empty(0, dtype=torch.long)
        while True:
            e, i = divmod(g, self.n)
            if e != epoch:
                epoch, order = e, self._epoch(e)
            yield int(order[i])
            g += self.world_size


# --------------------------------------------------------------------------- distributed


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    """Rank, world size and local rank from torch.distributed (or the torchrun environment)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device_type: str | None = None) -> DistInfo:
    """Under torchrun (``RANK``/``WORLD_SIZE`` set, world > 1) join the process group once: NCCL
    on CUDA (one GPU per local rank), gloo on CPU. A no-op for a single process.

    ``device_type`` ("cuda" | "cpu") defaults to that of :func:`lungsynth.runtime.device`.
    """
    import torch.distributed as dist

    info = dist_info()
    if info.world_size <= 1 or dist.is_initialized():
        return info
    use_cuda = torch.cuda.is_available() and (device_type or runtime.device().type) == "cuda"
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    atexit.register(_destroy_process_group)
    return dist_info()


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    # Meet before tearing down: a rank that destroys the group while a peer's gloo threads are
    # still talking to it makes that peer abort ("terminate called without an active exception").
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timedelta(seconds=60))
        else:
            dist.barrier()
    except Exception:  # a peer already died; tear down anyway
        pass
    dist.destroy_process_group()


# --------------------------------------------------------------------------- checkpoints


def _plain(obj: Any) -> Any:
    """Config values as types ``torch.load(weights_only=True)`` accepts and JSON can write."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _plain(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def save_checkpoint(payload: Mapping[str, Any], path: Path | str) -> Path:
    """``torch.save`` to ``<path>.tmp`` then ``os.replace``: the file is whole or absent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(dict(payload), fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint written by the engine, read with ``weights_only=True`` (never unpickles code)."""
    path = Path(path)
    if path.is_dir():
        path = path / LAST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train first (Trainer.fit writes "
                                f"{LAST_NAME} and {FINAL_NAME} into the run directory)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt or foreign file: say which and what to do
        raise ValueError(f"{path} is not a readable lungsynth checkpoint ({type(exc).__name__}: {exc}); "
                         f"delete it or point at another run directory") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a lungsynth checkpoint (format {CHECKPOINT_FORMAT!r} expected)")
    return ckpt


def _config_diff(stored: Any, wanted: Any, keys: Iterable[str] | None = None) -> list[str]:
    a, b = _plain(stored or {}), _plain(wanted or {})
    names = sorted(set(a) | set(b)) if keys is None else list(keys)
    return [f"{k}: checkpoint {a.get(k, '<missing>')!r} vs asked {b.get(k, '<missing>')!r}"
            for k in names if a.get(k, "<missing>") != b.get(k, "<missing>")]


def check_compatible(ckpt: Mapping[str, Any], path: Path | str, kind: str | None = None,
                     config: Mapping[str, Any] | None = None, keys: Iterable[str] | None = None) -> None:
    """Raise ValueError naming both sides when ``ckpt`` is of another kind or config."""
    if kind is not None and ckpt.get("kind") != kind:
        raise ValueError(f"{path} is a checkpoint of kind {ckpt.get('kind')!r}, but kind {kind!r} was asked "
                         f"for; load a {kind!r} checkpoint or build a {ckpt.get('kind')!r} model")
    if config is not None:
        diff = _config_diff(ckpt.get("config"), config, keys)
        if diff:
            raise ValueError(f"{path} was trained with another {ckpt.get('kind')!r} config ("
                             + "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
                             + "); build the model with the checkpoint's config or retrain")


def load_weights(path: Path | str, kind: str | None = None, config: Mapping[str, Any] | None = None, *,
                 modules: Mapping[str, nn.Module] | None = None, use_ema: bool | None = None,
                 keys: Iterable[str] | None = None,
                 map_location: str | torch.device = "cpu") -> dict[str, dict[str, torch.Tensor]]:
    """Weights of a run for downstream use: ``{module name: state_dict}``.

    Args:
        path: ``last.pt``, ``final.pt`` or a run directory (its ``final.pt``, else ``last.pt``).
        kind / config: refuse (ValueError naming both) a checkpoint of another kind or config;
            ``keys`` restricts the config comparison to those keys.
        modules: when given, ``load_state_dict`` into them (strict).
        use_ema: EMA weights (True), raw weights (False), or EMA when the checkpoint has it (None).
    """
    path = Path(path)
    if path.is_dir():
        path = path / FINAL_NAME if (path / FINAL_NAME).is_file() else path / LAST_NAME
    ckpt = load_checkpoint(path, map_location)
    check_compatible(ckpt, path, kind, config, keys)
    ema = ckpt.get("ema")
    if use_ema and not ema:
        raise ValueError(f"{path} holds no EMA weights (trained without ema_decay); use use_ema=False")
    weights = dict(ckpt["modules"])
    if ema and use_ema is not False:
        weights.update(ema)
    if modules is not None:
        missing = [n for n in modules if n not in weights]
        if missing:
            raise ValueError(f"{path} has no weights for module(s) {missing}; it has {sorted(weights)}")
        for name, module in modules.items():
            module.load_state_dict(weights[name])
    return weights


def _rng_state() -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state(legacy=True)
    return {
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": str(np_state[0]), "key": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["key"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["gauss"]))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- metrics


class MetricsLog:
    """``metrics.csv``: one row per logged step; new columns rewrite the header atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.columns: list[str] = []
        if path.is_file():
            with open(path, newline="") as fh:
                self.columns = next(csv.reader(fh), [])

    def _rows(self) -> list[dict[str, str]]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as fh:
            return list(csv.DictReader(fh))

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(buf.getvalue())
        os.replace(tmp, self.path)

    def truncate(self, last_step: int) -> None:
        """Drop rows after ``last_step`` (a resumed run rewrites what the killed run logged late)."""
        if self.path.is_file() and self.columns:
            self._rewrite([r for r in self._rows() if r.get("step") and int(float(r["step"])) <= last_step])

    def reset(self) -> None:
        """Start an empty log (a fresh run over an old run directory)."""
        self.columns = []
        if self.path.is_file():
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("")
            os.replace(tmp, self.path)

    def append(self, row: Mapping[str, Any]) -> None:
        new = [k for k in row if k not in self.columns]
        if new or not self.path.is_file():
            rows = self._rows()
            self.columns += new
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._rewrite(rows)
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self.columns, restval="").writerow(
                {k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in row.items()})


def read_metrics(path: Path | str) -> dict[str, np.ndarray]:
    """``metrics.csv`` (or a run directory holding one) as ``{column: float array}``, NaN where empty."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no metrics log at {path}; Trainer.fit writes {METRICS_NAME} into its run_dir")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    columns = list(rows[0]) if rows else []
    return {c: np.array([float(r[c]) if r.get(c) not in ("", None) else np.nan for r in rows]) for c in columns}


def plot_metrics(path: Path | str, keys: Sequence[str] | None = None, ax: Any = None, logy: bool | None = None,
                 smooth: int = 1) -> Any:
    """Training curves from ``metrics.csv`` (or a run directory) against the step.

    Args:
        keys: columns to draw; default every ``loss*`` and ``val_*`` column.
        ax: a matplotlib Axes to draw into (a new figure otherwise).
        logy: log scale; default when every drawn value is positive.
        smooth: moving-average window in logged points (1 = raw).
    Returns the Axes.
    """
    import matplotlib.pyplot as plt

    data = read_metrics(path)
    if keys is None:
        keys = [k for k in data if k.startswith("loss") or k.startswith("val_")]
    missing = [k for k in keys if k not in data]
    if missing:
        raise ValueError(f"{path}: no column(s) {missing} in the metrics log; columns: {sorted(data)}")
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    all_positive = True
    for key in keys:
        ok = ~np.isnan(data[key])
        x, y = data["step"][ok], data[key][ok]
        if smooth > 1 and len(y) >= smooth:
            y = np.convolve(y, np.ones(smooth) / smooth, mode="valid")
            x = x[smooth - 1:]
        all_positive &= bool(len(y) == 0 or (y > 0).all())
        ax.plot(x, y, label=key, marker="o" if key.startswith("val_") else None, markersize=3)
    if logy or (logy is None and all_positive and keys):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ax


# --------------------------------------------------------------------------- trainer


@dataclasses.dataclass
class FitResult:
    """What :meth:`Trainer.fit` did."""

    steps: int  # optimiser steps done in total (including those before a resume)
    start_step: int  # where this call started (0, or the resumed checkpoint's step)
    last_losses: dict[str, float]  # the last logged values
    seconds: float  # wall time of this call
    stopped_by: str  # "max_steps" | "time_budget" | "early_stop" | "already_done"
    checkpoint_path: Path | None  # last.pt
    final_path: Path | None  # final.pt
    run_dir: Path | None
    skipped_steps: int = 0  # optimiser steps this call skipped for non-finite gradients (see Trainer)


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=device.type == "cuda")
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not isinstance(obj, str):
        return type(obj)(_to_device(v, device) for v in obj) if not hasattr(obj, "_fields") else \
            type(obj)(*(_to_device(v, device) for v in obj))
    return obj


def _as_float(v: Any) -> float:
    return float(v.detach().float().item()) if isinstance(v, torch.Tensor) else float(v)


class TrainingStopped(SystemExit):
    """A fit stopped by SIGINT/SIGTERM after writing its checkpoint; exit status 130 (128 + SIGINT)."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        super().__init__(130)
        self.step, self.checkpoint = step, checkpoint


class _StopRequests:
    """SIGINT/SIGTERM become a flag the loop reads between steps (main thread only; a second signal
    raises KeyboardInterrupt at once). Restores the previous handlers on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "_StopRequests":
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


def step_if_finite(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], grad_clip: float | None,
                   logs: dict[str, Any] | None = None, suffix: str = "") -> bool:
    """Clip (when ``grad_clip``) and step ``opt``, unless the gradients hold a NaN or an infinity: then
    clear them and return False, as ``torch.amp.GradScaler`` skips such steps.

    Measured: bf16 autocast on an AMD EPYC with AVX512-BF16 (no AMX, torch 2.13 / oneDNN) returned NaN
    weight gradients of single 3D convolutions in a few LAND steps at t ~ 0, varying run to run; one
    such step would otherwise turn every weight into NaN. ``logs`` gets ``grad_norm<suffix>`` when clipping.
    """
    if grad_clip:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        if logs is not None:
            logs[f"grad_norm{suffix}"] = norm.detach()
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if not torch.isfinite(norm):
        opt.zero_grad(set_to_none=True)
        return False
    opt.step()
    return True


class Trainer:
    """Trains a :class:`TrainTask`; see the module docstring.

    Args:
        run_dir: where ``last.pt``, ``final.pt``, ``metrics.csv`` and ``engine.json`` go; None
            keeps everything in memory (no checkpoints, no log).
        max_steps: optimiser steps in total (the LR schedule spans them).
        time_budget_s: stop (and checkpoint) after this many seconds of this call.
        batch_size: per process; the effective batch is batch_size * grad_accum * world size.
        num_workers / collate_fn: DataLoader settings. Exact resume of random augmentations
            needs ``num_workers=0`` (worker RNGs are not checkpointed).
        lr / weight_decay: for :meth:`TrainTask.configure_optimizers`.
        schedule / warmup_steps / poly_power / min_lr_ratio: see :func:`lr_factor`.
        grad_accum: micro-batches per optimiser step (losses divided by it).
        grad_clip: max global grad norm per optimiser (None or 0: off).
        mixed_precision: autocast the training and validation steps (False: always fp32).
        precision: ``auto | bf16 | fp32`` (``lungsynth.runtime.choose_precision``): auto is bf16 on
            CUDA and on CPUs with AMX, fp32 elsewhere; None follows ``$LUNGSYNTH_PRECISION``. A step whose
            gradients are not finite is skipped (:func:`step_if_finite`; ``FitResult.skipped_steps``).
        ema_decay / ema_start / ema_every: see :class:`EMA` (``ema_decay=None``: no EMA).
        checkpoint_every: steps between ``last.pt`` writes (None: only at the end).
        log_every: steps between metrics rows (mean over the steps since the last row).
        val_every: steps between validations (None: never).
        keep_best: a validation number to minimise (e.g. ``"val_kid"``): after each validation that lowers it,
            the weights go to ``best.pt`` with ``{"metric", "value", "step"}`` under its ``"best"`` key (a fresh
            start removes an older run's ``best.pt``; a resumed one keeps beating the stored value). Without a
            ``run_dir`` they are kept in memory (``best`` / ``best_state``; :meth:`restore_best` loads them).
        patience: early stopping: end the fit after this many validations in a row that did not lower
            ``keep_best`` (None or 0: run to ``max_steps``; ``FitResult.stopped_by`` is ``"early_stop"``).
        seed: seeds the data order, and Python/NumPy/torch (``seed + rank``) on a fresh start.
        shuffle: shuffle the data order.
        device: default ``lungsynth.runtime.device()`` (``cuda:LOCAL_RANK`` under torchrun).
        progress: tqdm bar (None: only where stderr is a terminal or a notebook).
        fresh: ignore an existing ``last.pt`` in ``run_dir`` and start over (it is overwritten
            at the first checkpoint).
    """

    def __init__(self, run_dir: Path | str | None = None, *, max_steps: int = 1000,
                 time_budget_s: float | None = None, batch_size: int = 1, num_workers: int = 0,
                 collate_fn: Callable | None = None, lr: float = 1e-4, weight_decay: float = 0.0,
                 schedule: str = "constant", warmup_steps: int = 0, poly_power: float = 1.0,
                 min_lr_ratio: float = 0.0, grad_accum: int = 1, grad_clip: float | None = None,
                 mixed_precision: bool = True, precision: str | None = None, ema_decay: float | None = None, ema_start: int = 0,
                 ema_every: int = 1, checkpoint_every: int | None = None, log_every: int = 10,
                 val_every: int | None = None, keep_best: str | None = None, patience: int | None = None,
                 seed: int = 0, shuffle: bool = True,
                 device: torch.device | str | None = None, progress: bool | None = None,
                 fresh: bool = False) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown LR schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
        if max_steps < 0 or grad_accum < 1 or batch_size < 1 or log_every < 1:
            raise ValueError("max_steps >= 0, grad_accum >= 1, batch_size >= 1 and log_every >= 1 are required")
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.max_steps, self.time_budget_s = int(max_steps), time_budget_s
        self.batch_size, self.num_workers, self.collate_fn = int(batch_size), int(num_workers), collate_fn
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.schedule, self.warmup_steps = schedule, int(warmup_steps)
        self.poly_power, self.min_lr_ratio = float(poly_power), float(min_lr_ratio)
        self.grad_accum, self.grad_clip = int(grad_accum), grad_clip
        self.mixed_precision = bool(mixed_precision)
        self.precision = runtime._check_precision(precision, "Trainer(precision=)") if precision else None
        self.ema_decay, self.ema_start, self.ema_every = ema_decay, int(ema_start), int(ema_every)
        self.checkpoint_every, self.log_every, self.val_every = checkpoint_every, int(log_every), val_every
        if patience and not (keep_best and val_every):
            raise ValueError("patience (early stopping) needs keep_best and val_every: what to watch, and when")
        self.keep_best, self.patience = keep_best, int(patience or 0)
        self._best_value = math.inf  # the value keep_best must beat (best.pt's on a resume), set by each fit
        self._since_best = 0  # validations since keep_best last improved (early stopping)
        self.best: dict[str, Any] | None = None  # without a run_dir: {"metric", "value", "step"} of the best
        self.best_state: dict[str, dict[str, torch.Tensor]] | None = None  # and its weights (CPU copies)
        self.seed, self.shuffle, self.progress, self.fresh = int(seed), bool(shuffle), progress, bool(fresh)
        self._device_arg = device
        # state of the current/last fit
        self.task: TrainTask | None = None
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler] = {}
        self.ema: EMA | None = None
        self.step = 0
        self.data_position = 0
        self.device = torch.device("cpu")
        self.dist = DistInfo()
        self._elapsed_before = 0.0
        self.skipped_steps = 0
        self._params: dict[str, list[torch.nn.Parameter]] = {}
        self._t0 = time.perf_counter()

    @classmethod
    def from_config(cls, engine: Any, run_dir: Path | str | None = None, **kwargs: Any) -> "Trainer":
        """From ``cfg.engine`` (:class:`lungsynth.config.EngineConfig`) plus per-model ``kwargs``
        (``max_steps``, ``lr``, ``batch_size``, ``ema_decay``, ...)."""
        base = {"mixed_precision": engine.mixed_precision, "precision": engine.precision, "grad_clip": engine.grad_clip,
                "grad_accum": engine.grad_accum, "checkpoint_every": engine.checkpoint_every,
                "log_every": engine.log_every, "num_workers": engine.num_workers}
        base.update(kwargs)
        return cls(run_dir, **base)

    # -------------------------------------------------------------- helpers

    def settings(self) -> dict[str, Any]:
        """The trainer's settings as plain values (stored in checkpoints and engine.json)."""
        keys = ("max_steps", "time_budget_s", "batch_size", "num_workers", "lr", "weight_decay", "schedule",
                "warmup_steps", "poly_power", "min_lr_ratio", "grad_accum", "grad_clip", "mixed_precision",
                "precision", "ema_decay", "ema_start", "ema_every", "checkpoint_every", "log_every", "val_every",
                "keep_best", "patience", "seed", "shuffle")
        return {k: _plain(getattr(self, k)) for k in keys}

    @property
    def checkpoint_path(self) -> Path | None:
        return self.run_dir / LAST_NAME if self.run_dir is not None else None

    def _lr_lambda(self) -> Callable[[int], float]:
        def factor(step: int) -> float:
            return lr_factor(step, self.schedule, self.max_steps, self.warmup_steps, self.poly_power,
                             self.min_lr_ratio)
        return factor

    def _resolve_device(self) -> torch.device:
        if self._device_arg is not None:
            return torch.device(self._device_arg)
        dev = runtime.device()
        if dev.type == "cuda" and self.dist.distributed:
            return torch.device("cuda", self.dist.local_rank)
        return dev

    def _loader(self, data: Any, start: int) -> Iterator[Any]:
        if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
            raise TypeError(f"Trainer.fit needs a map-style dataset (with __len__ and __getitem__), got "
                            f"{type(data).__name__}; wrap a list of samples in a torch Dataset")
        sampler = InfiniteSampler(len(data), self.seed, self.shuffle, self.dist.rank, self.dist.world_size, start)
        # A private generator: building the iterator must not draw from the global RNG (exact resume).
        loader = torch.utils.data.DataLoader(
            data, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
            collate_fn=self.collate_fn, pin_memory=self.device.type == "cuda", drop_last=False,
            generator=torch.Generator().manual_seed(self.seed), persistent_workers=self.num_workers > 0)
        return iter(loader)

    def _all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Average gradients over processes: DistributedDataParallel's arithmetic, done after
        accumulation so it works for any number of modules, optimisers and forward passes."""
        import torch.distributed as dist

        has = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=self.device)
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        grads = []
        for p, h in zip(params, has.tolist()):
            if h:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        bucket_elems = 1 << 23
        for group in by_dtype.values():
            start = 0
            while start < len(group):
                bucket, n = [], 0
                while start < len(group) and (not bucket or n + group[start].numel() <= bucket_elems):
                    bucket.append(group[start])
                    n += group[start].numel()
                    start += 1
                flat = torch.cat([g.reshape(-1) for g in bucket])
                dist.all_reduce(flat)
                flat /= self.dist.world_size
                offset = 0
                for g in bucket:
                    g.copy_(flat[offset:offset + g.numel()].view_as(g))
                    offset += g.numel()

    def _mean_over_processes(self, values: dict[str, float],
                             counts: dict[str, float] | None = None) -> dict[str, float]:
        if not self.dist.distributed or not values:
            return values
        import torch.distributed as dist

        keys = sorted(values)
        counts = counts or {k: 1.0 for k in keys}
        t = torch.tensor([values[k] * counts[k] for k in keys] + [counts[k] for k in keys], dtype=torch.float64,
                         device=self.device)
        dist.all_reduce(t)
        n = len(keys)
        return {k: float(t[i] / t[n + i]) for i, k in enumerate(keys)}

    def _gather_rng(self) -> list[dict[str, Any]]:
        state = _rng_state()
        if not self.dist.distributed:
            return [state]
        import torch.distributed as dist

        out: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(out, state)
        return out

    def _broadcast_modules(self, modules: Mapping[str, nn.Module]) -> None:
        import torch.distributed as dist

        for module in modules.values():
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, src=0)

    # -------------------------------------------------------------- checkpoints

    def _payload(self, full: bool, rng: list[dict[str, Any]] | None) -> dict[str, Any]:
        assert self.task is not None
        payload: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT, "kind": str(self.task.kind), "config": _plain(self.task.config()),
            "step": self.step,
            "modules": {n: m.state_dict() for n, m in self.task.modules().items()},
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }
        if full:
            payload.update({
                "data_position": self.data_position,
                "elapsed_s": self._elapsed_before + (time.perf_counter() - self._t0),
                "world_size": self.dist.world_size,
                "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
                "schedulers": {n: s.state_dict() for n, s in self.schedulers.items()},
                "ema_settings": self.ema.settings() if self.ema is not None else None,
                "rng": rng,
                "trainer": self.settings(),
            })
        return payload

    def save(self, final: bool = False) -> Path | None:
        """Write ``last.pt`` (and ``final.pt`` when ``final``) from rank 0; collective under DDP."""
        if self.run_dir is None:
            return None
        rng = self._gather_rng()
        path = None
        if self.dist.is_main:
            path = save_checkpoint(self._payload(True, rng), self.run_dir / LAST_NAME)
            if final:
                save_checkpoint(self._payload(False, None), self.run_dir / FINAL_NAME)
        if self.dist.distributed:
            import torch.distributed as dist

            dist.barrier()
        return self.run_dir / LAST_NAME if path is None else path

    def _keep_if_best(self, val: Mapping[str, float]) -> None:
        """Write ``best.pt`` when ``val[keep_best]`` beats the stored best (the value travels in the file,
        so a killed run resumes comparing against what ``best.pt`` holds); without a run directory, keep a CPU
        copy of the weights in ``best_state``. Counts the validations since the last improvement (``patience``)."""
        if self.keep_best not in val:
            raise ValueError(f"keep_best={self.keep_best!r}, but validation gave only {sorted(val)}")
        path = self.run_dir / BEST_NAME if self.run_dir is not None else None
        value = float(val[self.keep_best])
        if not (math.isfinite(value) and value < self._best_value):
            self._since_best += 1
            return
        self._best_value, self._since_best = value, 0
        best = {"metric": self.keep_best, "value": value, "step": self.step}
        if path is None:
            assert self.task is not None
            self.best = best
            self.best_state = {n: {k: v.detach().to("cpu", copy=True) for k, v in m.state_dict().items()}
                               for n, m in self.task.modules().items()}
        elif self.dist.is_main:
            save_checkpoint({**self._payload(False, None), "best": best}, path)

    def restore_best(self) -> dict[str, Any] | None:
        """Load the in-memory best weights (``keep_best`` without a run directory) into the task's modules;
        returns ``{"metric", "value", "step"}``, or None when no validation improved (the weights stay as trained)."""
        if self.best_state is None or self.task is None:
            return None
        for name, module in self.task.modules().items():
            module.load_state_dict(self.best_state[name])
        return self.best

    def _restore(self, ckpt: Mapping[str, Any], path: Path) -> None:
        assert self.task is not None
        check_compatible(ckpt, path, self.task.kind, self.task.config())
        if "optimizers" not in ckpt:
            raise ValueError(f"{path} is a weights-only export; resume from {LAST_NAME}, or pass fresh=True")
        for name, module in self.task.modules().items():
            module.load_state_dict(ckpt["modules"][name])
        if set(ckpt["optimizers"]) != set(self.optimizers):
            raise ValueError(f"{path} has optimisers {sorted(ckpt['optimizers'])} but the task configures "
                             f"{sorted(self.optimizers)}; pass fresh=True or use another run_dir")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(ckpt["optimizers"][name])
        for name, sched in self.schedulers.items():
            sched.load_state_dict(ckpt["schedulers"][name])
            sched.lr_lambdas = [self._lr_lambda() for _ in sched.optimizer.param_groups]
        if self.ema is not None:
            if ckpt.get("ema"):
                self.ema.load_state_dict(ckpt["ema"])
            else:
                self.ema = EMA(self.task.modules(), self.ema_decay or 0.0, self.ema_start, self.ema_every)
        self.step = int(ckpt["step"])
        self.data_position = int(ckpt["data_position"])
        self._elapsed_before = float(ckpt.get("elapsed_s", 0.0))
        rng = ckpt["rng"]
        _set_rng_state(rng[self.dist.rank % len(rng)])

    # -------------------------------------------------------------- the loop

    def _optimizer_step(self, name: str, opt: torch.optim.Optimizer, logs: dict[str, Any]) -> None:
        params = self._params[name]
        if self.dist.distributed:
            self._all_reduce_grads(params)
        if not step_if_finite(opt, [p for p in params if p.grad is not None], self.grad_clip, logs,
                              "" if len(self.optimizers) == 1 else f"_{name}"):
            self.skipped_steps += 1
            if self.skipped_steps == 1:
                warnings.warn(f"step {self.step}: non-finite gradients of optimiser {name!r}; the step is skipped "
                              f"(precision {runtime.choose_precision(self.device, self.precision).name}); "
                              "FitResult.skipped_steps counts them", RuntimeWarning, stacklevel=2)

    def _train_step(self, data_iter: Iterator[Any]) -> dict[str, Any]:
        assert self.task is not None
        names = list(self.optimizers)
        keys = {n: loss_key(n, len(names)) for n in names}
        params = self._params
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        sums: dict[str, Any] = {}
        stepped = {n: False for n in names}
        for _ in range(self.grad_accum):
            batch = _to_device(next(data_iter), self.device)
            self.data_position += self.batch_size * self.dist.world_size
            with runtime.autocast(self.device, enabled=self.mixed_precision, precision=self.precision):
                out = self.task.training_step(batch, self.step)
            if not isinstance(out, Mapping):
                raise TypeError(f"{type(self.task).__name__}.training_step must return a dict with "
                                f"{sorted(keys.values())}, got {type(out).__name__}")
            losses = [(n, out.get(keys[n])) for n in names if out.get(keys[n]) is not None]
            if not losses and not any(k in out for k in keys.values()):
                raise KeyError(f"{type(self.task).__name__}.training_step returned {sorted(out)}; it must "
                               f"return the loss of each optimiser under {sorted(keys.values())}")
            for i, (n, loss) in enumerate(losses):
                if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
                    raise TypeError(f"{keys[n]} must be a tensor attached to the graph, got {type(loss).__name__}")
                # Each loss reaches only its own optimiser's parameters.
                (loss / self.grad_accum).backward(inputs=params[n], retain_graph=i < len(losses) - 1)
                stepped[n] = True
            for k, v in out.items():
                if v is None:
                    continue
                v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
                sums[k] = sums.get(k, 0.0) + v / self.grad_accum
        logs: dict[str, Any] = dict(sums)
        for n, opt in self.optimizers.items():
            if stepped[n]:
                self._optimizer_step(n, opt, logs)
        for n, sched in self.schedulers.items():
            logs["lr" if len(names) == 1 else f"lr_{n}"] = sched.get_last_lr()[0]
            # The LR follows the global step, also for an optimiser that skipped this step.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                sched.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.task.modules(), self.step)
        return logs

    @torch.no_grad()
    def validate(self, val_data: Any = None) -> dict[str, float]:
        """Run :meth:`TrainTask.validation_step` over ``val_data`` (sharded over processes), or once
        with ``batch=None``; returns the means with a ``val_`` prefix."""
        assert self.task is not None
        modules = self.task.modules()
        modes = {n: m.training for n, m in modules.items()}
        for m in modules.values():
            m.eval()
        sums: dict[str, float] = {}
        counts: dict[str, float] = {}
        try:
            with runtime.autocast(self.device, enabled=self.mixed_precision, precision=self.precision):
                if val_data is None:
                    batches: Iterable[Any] = [None]
                else:
                    idx = list(range(self.dist.rank, len(val_data), self.dist.world_size))
                    batches = torch.utils.data.DataLoader(torch.utils.data.Subset(val_data, idx),
                                                          batch_size=self.batch_size, shuffle=False,
                                                          collate_fn=self.collate_fn, num_workers=0)
                for batch in batches:
                    out = self.task.validation_step(_to_device(batch, self.device), self.step)
                    for k, v in (out or {}).items():
                        sums[k] = sums.get(k, 0.0) + _as_float(v)
                        counts[k] = counts.get(k, 0.0) + 1.0
        finally:
            for n, m in modules.items():
                m.train(modes[n])
        means = {k: sums[k] / counts[k] for k in sums}
        means = self._mean_over_processes(means, counts)
        return {(k if k.startswith("val_") else f"val_{k}"): v for k, v in means.items()}

    def fit(self, task: TrainTask, data: Any, val_data: Any = None) -> FitResult:
        """Train ``task`` on the map-style dataset ``data`` up to ``max_steps`` or the time budget.

        Resumes from ``run_dir/last.pt`` when it exists (unless ``fresh``); a checkpoint of another
        kind or config is refused. Returns a :class:`FitResult`.
        """
        from tqdm.auto import tqdm

        self.dist = init_distributed(torch.device(self._device_arg).type if self._device_arg is not None else None)
        self.device = self._resolve_device()
        self.task = task
        self._t0 = time.perf_counter()
        self.skipped_steps = 0
        task.device = self.device
        modules = task.modules()
        if not modules:
            raise ValueError(f"{type(task).__name__}.modules() returned no modules")
        for m in modules.values():
            m.to(self.device).train()
        task.setup(self.device)
        self.optimizers = dict(task.configure_optimizers(self.lr, self.weight_decay))
        if not self.optimizers:
            raise ValueError(f"{type(task).__name__}.configure_optimizers() returned no optimisers")
        self._params = {n: [p for g in o.param_groups for p in g["params"] if p.requires_grad]
                        for n, o in self.optimizers.items()}
        self.schedulers = {n: torch.optim.lr_scheduler.LambdaLR(o, [self._lr_lambda() for _ in o.param_groups])
                           for n, o in self.optimizers.items()}
        self.ema = (EMA({n: modules[n] for n in task.ema_modules()}, self.ema_decay, self.ema_start,
                        self.ema_every) if self.ema_decay is not None else None)
        self.step, self.data_position, self._elapsed_before = 0, 0, 0.0

        last = self.checkpoint_path
        resumed = last is not None and last.is_file() and not self.fresh
        if resumed:
            assert last is not None
            # CPU first: RNG states must stay CPU tensors; load_state_dict moves the rest.
            self._restore(load_checkpoint(last, map_location="cpu"), last)
        else:
            runtime.seed_everything(self.seed + self.dist.rank)
            if self.run_dir is not None and self.dist.is_main and (self.run_dir / BEST_NAME).is_file():
                (self.run_dir / BEST_NAME).unlink()  # an earlier run's best is not this run's
        self._since_best, self.best, self.best_state = 0, None, None
        # the value to beat, read once here by every process (so all agree when patience ends the fit)
        best_path = self.run_dir / BEST_NAME if self.run_dir is not None else None
        stored_best = bool(self.keep_best) and resumed and best_path is not None and best_path.is_file()
        self._best_value = float(load_checkpoint(best_path)["best"]["value"]) if stored_best else math.inf
        if self.dist.distributed:
            self._broadcast_modules(modules)
            if self.ema is not None and not resumed:
                for n, shadow in self.ema.modules.items():
                    shadow.load_state_dict(modules[n].state_dict())
        start_step = self.step

        log: MetricsLog | None = None
        if self.run_dir is not None and self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            runtime.write_json_atomic(self.run_dir / SETTINGS_NAME, {
                "kind": task.kind, "config": _plain(task.config()), "trainer": self.settings(),
                "world_size": self.dist.world_size, "device": str(self.device), "resumed_from": start_step,
                "precision": dataclasses.asdict(runtime.choose_precision(self.device, self.precision))
                if self.mixed_precision else {"name": "fp32", "reason": "mixed_precision off"}})
            log = MetricsLog(self.run_dir / METRICS_NAME)
            if resumed:
                log.truncate(start_step)
            else:
                log.reset()

        if self.step >= self.max_steps:
            return FitResult(self.step, start_step, {}, 0.0, "already_done", last if resumed else None,
                             self.run_dir / FINAL_NAME if self.run_dir and (self.run_dir / FINAL_NAME).is_file()
                             else None, self.run_dir)

        # The data iterator is built before the RNG matters again; it never touches the global RNG.
        data_iter = self._loader(data, self.data_position // self.dist.world_size)
        show = self.dist.is_main and self.progress is not False
        disable = True if not show else (None if self.progress is None else False)  # None: TTY only
        bar = tqdm(total=self.max_steps, initial=self.step, disable=disable, desc=str(task.kind),
                   dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
        last_logged: dict[str, float] = {}
        stop = _StopRequests()
        try:
            with stop:
                stopped_by = self._loop(data_iter, log, bar, last_logged, val_data, last, stop)
        finally:
            bar.close()
            del data_iter
        if stopped_by == "signal":
            path = self.save()
            print(f"{task.kind}: stopped at step {self.step}; run the same command to resume"
                  + ("" if path is not None else " (no run directory: nothing was saved)"), file=sys.stderr)
            raise TrainingStopped(self.step, path)
        path = self.save(final=True)
        return FitResult(self.step, start_step, last_logged, time.perf_counter() - self._t0, stopped_by, path,
                         self.run_dir / FINAL_NAME if self.run_dir is not None else None, self.run_dir,
                         self.skipped_steps)

    def _stop_requested(self, stop: _StopRequests) -> bool:
        """True on every process once any process got SIGINT/SIGTERM (one collective under DDP)."""
        flag = stop.signum is not None
        if self.dist.distributed:
            import torch.distributed as dist

            t = torch.tensor([float(flag)], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
            if flag and stop.signum is None:
                stop.signum = int(signal.SIGTERM)
        return flag

    def _loop(self, data_iter: Iterator[Any], log: MetricsLog | None, bar: Any, last_logged: dict[str, float],
              val_data: Any, last: Path | None, stop: _StopRequests) -> str:
        """The steps of :meth:`fit` until ``max_steps``, the time budget or a stop request; returns which."""
        task = self.task
        assert task is not None
        window: dict[str, list[Any]] = {}
        stopped_by = "max_steps"
        while self.step < self.max_steps:
            logs = self._train_step(data_iter)
            for k, v in logs.items():
                window.setdefault(k, []).append(v)
            bar.update(1)
            done = self.step >= self.max_steps
            over_budget = (self.time_budget_s is not None
                           and time.perf_counter() - self._t0 >= self.time_budget_s)
            if self.dist.distributed and self.time_budget_s is not None:
                import torch.distributed as dist

                flag = torch.tensor([float(over_budget)], device=self.device)
                dist.broadcast(flag, src=0)
                over_budget = bool(flag.item())
            if over_budget and not done:
                stopped_by, done = "time_budget", True
            if self._stop_requested(stop) and not done:
                stopped_by, done = "signal", True
            if self.step % self.log_every == 0 or done:
                means = {k: sum(_as_float(x) for x in v) / len(v) for k, v in window.items()}
                window.clear()
                bad = [k for k, v in means.items() if k.startswith("loss") and not math.isfinite(v)]
                if bad:
                    raise FloatingPointError(f"{task.kind}: non-finite {bad} at step {self.step}; lower "
                                             f"the lr or set grad_clip (last good checkpoint: {last})")
                lr_keys = {k for k in means if k.startswith("lr")}
                means = {**self._mean_over_processes({k: v for k, v in means.items() if k not in lr_keys}),
                         **{k: means[k] for k in lr_keys}}
                last_logged.clear()
                last_logged.update(means)
                if log is not None:
                    log.append({"step": self.step, **means,
                                "seconds": round(self._elapsed_before + time.perf_counter() - self._t0, 3)})
                shown = {k: f"{v:.4g}" for k, v in means.items() if k.startswith("loss")}
                bar.set_postfix(shown, refresh=False)
            if self.val_every and (self.step % self.val_every == 0):
                val = self.validate(val_data)
                if val and log is not None:
                    log.append({"step": self.step, **val,
                                "seconds": round(self._elapsed_before + time.perf_counter() - self._t0, 3)})
                last_logged.update(val)
                if self.keep_best:
                    self._keep_if_best(val)
                    if self.patience and self._since_best >= self.patience and not done:
                        stopped_by, done = "early_stop", True
            if done:
                break
            if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                self.save()
        return stopped_by


def probe_steps(task: TrainTask, batch: Any, steps: int, *, lr: float = 1e-4,
                device: torch.device | None = None) -> dict[str, Any]:
    """``steps`` optimiser steps of ``task`` on one fixed ``batch``, each forward under the run's
    autocast (:func:`lungsynth.runtime.autocast`) as :class:`Trainer` runs it, without clipping,
    accumulation or EMA: what a benchmark times and compares across precisions.

    Args:
        batch: a collated batch (what ``training_step`` receives).
    Returns:
        ``{"losses": [loss of each step] (the first optimiser's), "seconds": median seconds of the
        steps after the first (the first warms up), "first_s": the first step's seconds,
        "skipped_steps": steps skipped for non-finite gradients (:func:`step_if_finite`)}``.
    """
    if steps < 2:
        raise ValueError(f"probe_steps needs >= 2 steps (the first one warms up), got {steps}")
    dev = device or runtime.device()
    task.setup(dev)
    modules = task.modules()
    for m in modules.values():
        m.to(dev).train()
    opts = task.configure_optimizers(lr, 0.0)
    params = {n: [p for g in o.param_groups for p in g["params"] if p.requires_grad] for n, o in opts.items()}
    keys = {n: loss_key(n, len(opts)) for n in opts}
    batch = _to_device(batch, dev)
    losses, times, skipped = [], [], 0
    for step in range(steps):
        t0 = time.perf_counter()
        for o in opts.values():
            o.zero_grad(set_to_none=True)
        with runtime.autocast(dev):
            out = task.training_step(batch, step)
        present = [(n, out[keys[n]]) for n in opts if out.get(keys[n]) is not None]
        for i, (n, loss) in enumerate(present):
            loss.backward(inputs=params[n], retain_graph=i < len(present) - 1)
            skipped += not step_if_finite(opts[n], [p for p in params[n] if p.grad is not None], None)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(present[0][1].detach()))
    return {"losses": losses, "seconds": float(np.median(times[1:])), "first_s": times[0], "skipped_steps": skipped}
