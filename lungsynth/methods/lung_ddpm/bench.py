"""``lungsynth bench lung-ddpm``: a train step and sampling with / without AAS, each in its own process."""

from __future__ import annotations

import argparse
import time
from typing import Any

CHILD = "lungsynth.methods.lung_ddpm.bench:_bench_child"


def _bench_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration in a fresh process: a train step, or one sample with / without AAS."""
    import torch

    from lungsynth.runtime import peak_rss_mb

    from lungsynth.config import get_config
    from lungsynth.engine import probe_steps
    from lungsynth.methods.lung_ddpm.sample import LungDDPM
    from lungsynth.methods.lung_ddpm.train import LungDdpmTask
    from lungsynth.runtime import device

    torch.manual_seed(0)
    cfg = get_config(spec["profile"], {**spec["overrides"], "data.size_ddpm": spec["size"],
                                       "lung_ddpm.sample_steps": spec["steps"],
                                       "lung_ddpm.sampler": spec.get("sampler", "ddpm")})
    dev = device()
    s = int(spec["size"])
    task = LungDdpmTask(cfg, "layout")
    task.unet.to(dev)
    ct = torch.rand(1, 1, s, s, s, device=dev)
    layout = torch.zeros(1, 1, s, s, s, device=dev)
    layout[..., s // 4: 3 * s // 4, s // 4: 3 * s // 4, s // 8: s // 2] = 1
    layout[..., s // 2 - 2: s // 2 + 2, s // 2 - 2: s // 2 + 2, s // 4 - 2: s // 4 + 2] = 2
    model = LungDDPM(task.unet, task.scheduler, cfg)
    cuda = dev.type == "cuda"
    params = sum(p.numel() for p in task.unet.parameters())

    def peak_mb() -> float:
        return (torch.cuda.max_memory_allocated() / 2**20 if cuda
                else peak_rss_mb())

    if spec["what"] == "train_step":  # a short run: optimiser steps on one batch (a training cube), the loss of each
        side = int(spec.get("train_size", s))
        batch = {"ct": ct[..., :side, :side, :side], "layout": layout[..., :side, :side, :side]}
        r = probe_steps(task, batch, 1 + int(spec["repeats"]), device=dev)
        return {**r, "peak_mb": peak_mb(), "params": params}

    def once() -> float:
        t0 = time.perf_counter()
        model.sample(layout.cpu(), ct.cpu(), aas=spec["what"] == "sample_aas", device=dev,
                     generator=torch.Generator().manual_seed(0))
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    once()  # warm-up
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    return {"seconds": once(), "peak_mb": peak_mb(), "params": params}


def bench_lung_ddpm(args: argparse.Namespace) -> int:
    """``lungsynth bench lung-ddpm [--size S]``: train step, sampling with and without AAS (the cost of
    AAS as a ratio), each configuration in its own process (peak RSS never goes down in one)."""
    from lungsynth.config import get_config, parse_overrides
    from lungsynth.runtime import compare_precisions, run_child

    overrides = parse_overrides(args.overrides)
    cfg = get_config(args.profile, overrides)
    size = int(args.size or cfg.data.size_ddpm)
    levels = len(cfg.lung_ddpm.unet_channels)
    if size % 2 ** (levels - 1):
        raise ValueError(f"--size {size} must be a multiple of {2 ** (levels - 1)} ({levels}-level U-Net)")
    steps, sampler = int(cfg.lung_ddpm.sample_steps), str(cfg.lung_ddpm.sampler)
    patch = int(cfg.lung_ddpm.train_patch)
    train_size = patch if 0 < patch < size else size  # the profile trains on cubes of this side
    print(f"Lung-DDPM bench: sampling {size}^3, training items {train_size}^3, channels "
          f"{tuple(cfg.lung_ddpm.unet_channels)}, {sampler} with {steps} sampling steps, repeats {args.repeats}; "
          f"each number from its own process")
    res = {}
    for what in ("train_step", "sample_no_aas", "sample_aas"):
        spec = {"profile": cfg.profile, "overrides": overrides, "size": size, "steps": steps, "what": what,
                "repeats": args.repeats, "sampler": sampler, "train_size": train_size}
        res[what] = r = run_child(CHILD, spec)
        print(f"  {what:14s} {r['seconds']:8.3f} s  peak {r['peak_mb']:9.1f} MB  params {r['params'] / 1e6:.2f}M",
              flush=True)
    a, n = res["sample_aas"], res["sample_no_aas"]
    print(f"ratios AAS / no AAS: time {a['seconds'] / n['seconds']:.3f}  peak memory {a['peak_mb'] / n['peak_mb']:.3f}")
    print(f"per sampling step: {n['seconds'] / steps:.3f} s (no AAS), {a['seconds'] / steps:.3f} s (AAS)")
    T = int(cfg.lung_ddpm.num_train_timesteps)
    if args.paper_sampler and (sampler, steps) != ("ddpm", T):
        spec = {"profile": cfg.profile, "overrides": overrides, "size": size, "steps": T, "what": "sample_aas",
                "repeats": args.repeats, "sampler": "ddpm"}
        p = run_child(CHILD, spec)
        print(f"  the paper's sampler (DDPM, {T} steps, AAS) {p['seconds']:8.3f} s")
        print(f"ratio paper / this sampler ({sampler}, {steps} steps): time {p['seconds'] / a['seconds']:.1f}x")
    spec = {"profile": cfg.profile, "overrides": overrides, "size": size, "steps": steps,
            "repeats": max(int(args.repeats), 5), "train_size": train_size}
    compare_precisions(CHILD, {"train step": {**spec, "what": "train_step"},
                               f"one sample (AAS, {steps})": {**spec, "what": "sample_aas"}})
    return 0
