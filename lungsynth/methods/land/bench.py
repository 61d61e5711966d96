"""LAND (chapter 03): ``lungsynth bench land`` (additive vs concatenated skips, the two precisions, and the
peak memory of Table 1 at two sample counts), each measured in a fresh process (peak RSS is per process)."""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch

from lungsynth.methods.land.model import LandDenoiser, denoiser_spec, land_loss, make_scheduler
from lungsynth.runtime import compare_precisions, peak_rss_mb, run_child


def _run_child(fn: str, spec: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    return run_child(f"lungsynth.methods.land.bench:{fn}", spec, timeout=timeout)


# --------------------------------------------------------------------------- bench


def _bench_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One benchmark configuration in a fresh process: a train step, a denoiser call, or a whole sample."""
    from lungsynth.diffusion.samplers import sample as reverse
    from lungsynth.engine import SimpleTask, probe_steps
    from lungsynth.runtime import autocast, device

    torch.manual_seed(0)
    dev = device()
    den = LandDenoiser(spec["denoiser"]).to(dev)
    s, k = int(spec["latent_size"]), int(spec["denoiser"]["cond_channels"])
    z = torch.randn(1, 4, s, s, s, device=dev)
    grid = torch.rand(1, k, s, s, s, device=dev)
    sched = make_scheduler(spec["denoiser"], "ddim")
    what, reps = spec["what"], int(spec.get("repeats", 3))
    cuda = dev.type == "cuda"

    if what == "train_step":  # a short run: optimiser steps on one batch, the loss of each
        task = SimpleTask(den, lambda m, b: land_loss(m, sched, b["z"], b["grid"], 5.0), kind="land-bench")
        base = peak_rss_mb()
        r = probe_steps(task, {"z": z, "grid": grid}, 1 + reps, device=dev)
        peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda
                else peak_rss_mb())
        return {**r, "peak_mb": peak, "delta_mb": peak if cuda else max(peak - base, 0.0),
                "params": sum(p.numel() for p in den.parameters())}

    def once() -> None:
        if what == "denoiser_step":
            with torch.no_grad(), autocast(dev):
                den.eval()(torch.cat([z, grid], 1), torch.tensor([500], device=dev), grid)
        else:
            den.eval()
            reverse(lambda x, t, **kw: den(x, t, **kw), sched, (1, 4, s, s, s), int(spec["steps"]), device=dev,
                    condition={"concat": grid, "grid": grid}, progress=False)
        if cuda:
            torch.cuda.synchronize()

    base = peak_rss_mb()  # imports + model + inputs
    once()  # warm-up
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps if what == "denoiser_step" else 1):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda
            else peak_rss_mb())
    # CPU: peak RSS minus the RSS before the first call = what the computation itself added
    return {"seconds": float(np.median(times)), "peak_mb": peak, "delta_mb": peak if cuda else max(peak - base, 0.0),
            "params": sum(p.numel() for p in den.parameters())}


def bench_land(args: argparse.Namespace) -> int:
    """``lungsynth bench land [--size S]``: additive vs concatenated skips, each config in its own process."""
    from lungsynth.config import get_config, parse_overrides

    cfg = get_config(args.profile, parse_overrides(args.overrides))
    size = int(args.size or cfg.data.size_3d)
    if size % (4 * 2 ** (len(cfg.land.unet_channels) - 1)):
        raise ValueError(f"--size {size} must be a multiple of {4 * 2 ** (len(cfg.land.unet_channels) - 1)} "
                         f"(x4 autoencoder, {len(cfg.land.unet_channels)}-level U-Net)")
    s = size // 4
    steps = int(cfg.land.ddim_steps)
    print(f"LAND denoiser bench: image {size}^3 -> latent 4x{s}^3, channels {tuple(cfg.land.unet_channels)}, "
          f"{cfg.land.num_res_blocks} res blocks/level, condition latentmask-texture, DDIM {steps} steps, "
          f"repeats {args.repeats}; each number from its own process")
    res: dict[tuple[str, str], dict[str, Any]] = {}
    for what in ("train_step", "denoiser_step", "sample"):
        for skip in ("additive", "concat"):
            spec = {"denoiser": denoiser_spec(cfg, "latentmask-texture", 4, None, skip), "latent_size": s,
                    "what": what, "steps": steps, "repeats": args.repeats}
            r = _run_child("_bench_child", spec)
            res[(what, skip)] = r
            print(f"  {what:14s} {skip:9s} {r['seconds']:8.3f} s  peak {r['peak_mb']:9.1f} MB  "
                  f"(+{r['delta_mb']:.1f} MB over the loaded process)  params {r['params'] / 1e6:.2f}M", flush=True)
    print("ratios additive / concat (memory: CUDA max allocated; CPU: peak RSS increase over the loaded process):")
    for what in ("train_step", "denoiser_step", "sample"):
        a, c = res[(what, "additive")], res[(what, "concat")]
        mem = a["delta_mb"] / c["delta_mb"] if c["delta_mb"] > 0 else float("nan")
        print(f"  {what:14s} time {a['seconds'] / c['seconds']:.3f}  peak memory {mem:.3f}")
    a, c = res[("sample", "additive")], res[("sample", "concat")]
    print(f"  parameters {a['params'] / c['params']:.3f}")
    spec = {"denoiser": denoiser_spec(cfg, "latentmask-texture", 4, None, cfg.land.skip), "latent_size": s,
            "steps": steps, "repeats": max(int(args.repeats), 5)}
    compare_precisions("lungsynth.methods.land.bench:_bench_child",
                       {"train step": {**spec, "what": "train_step"}, f"sample (DDIM {steps})": {**spec, "what": "sample"}})
    evaluate_memory(cfg, args.overrides)
    return 0


def _evaluate_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process: Table 1 of one variant at ``n`` samples (held-out conditions, nothing written)."""
    from lungsynth.config import get_config, parse_overrides
    from lungsynth.methods.land.evaluate import evaluate

    cfg = get_config(spec["profile"], parse_overrides(spec.get("overrides")))
    t0 = time.perf_counter()
    evaluate(cfg, (spec["variant"],), n_samples=int(spec["n"]), memory=False, condition_sets=("held-out",),
             write=False)
    return {"seconds": time.perf_counter() - t0, "peak_mb": peak_rss_mb()}


EVALUATE_SAMPLE_COUNTS = (2, 8)


def evaluate_memory(cfg: Any, overrides: Any = None, variant: str = "mask") -> dict[int, dict[str, Any]] | None:
    """Peak host memory of ``evaluate`` at 2 and 8 samples, each in a fresh process: a ratio near 1 shows that
    the chunked evaluation's memory does not grow with the sample count. Needs a trained ``variant``."""
    from lungsynth.methods.land.train import default_run_dir

    if not (default_run_dir(cfg, variant, create=False) / "final.pt").is_file():
        print(f"evaluate memory: skipped, LAND {variant} is not trained in profile {cfg.profile} "
              f"(lungsynth land train --variant {variant} --profile {cfg.profile})")
        return None
    spec = {"profile": cfg.profile, "overrides": list(overrides or []), "variant": variant}
    res = {n: _run_child("_evaluate_child", {**spec, "n": n}, timeout=3600) for n in EVALUATE_SAMPLE_COUNTS}
    lo, hi = (res[n] for n in EVALUATE_SAMPLE_COUNTS)
    print(f"evaluate ({variant}, chunks of {cfg.land.eval_batch}): " + ", ".join(
        f"{n} samples peak {r['peak_mb']:.0f} MB in {r['seconds']:.0f} s" for n, r in res.items())
        + f"; peak ratio {EVALUATE_SAMPLE_COUNTS[1]}/{EVALUATE_SAMPLE_COUNTS[0]} = {hi['peak_mb'] / lo['peak_mb']:.3f}")
    return res
