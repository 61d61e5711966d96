"""``lungsynth bench bbox-ldm``: what each conditioning configuration costs per training step and per sample.

Each (configuration, what) pair runs in its own process (peak RSS never goes down within one); on
CUDA the peak is ``max_memory_allocated``. Untrained networks of the profile's sizes on random
latents: speed and memory do not depend on the weights. Ratios are relative to configuration 1.
"""

from __future__ import annotations

import argparse
from typing import Any

from lungsynth.runtime import compare_precisions, run_child

CHILD = "lungsynth.methods.bbox_ldm.bench:_child"


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from lungsynth.config import get_config
    from lungsynth.diffusion.samplers import sample
    from lungsynth.diffusion.schedules import make_scheduler
    from lungsynth.engine import probe_steps
    from lungsynth.methods.bbox_ldm.train import BboxLdmTask
    from lungsynth.runtime import device, measure

    cfg = get_config(spec["profile"], spec["overrides"])
    dev = device()
    torch.manual_seed(0)
    size = int(spec["size"] or cfg.data.size_2d)
    if size != int(cfg.data.size_2d):  # the flattened mask context is as wide as the latent grid
        from lungsynth.config import apply_overrides

        cfg = apply_overrides(cfg, {"data.size_2d": size})
    lat, c = size // 4, cfg.bbox_ldm
    task = BboxLdmTask(cfg, spec["config"], latent_channels=4)
    for m in task.modules().values():
        m.to(dev)
    B = int(c.batch_size)
    mask = torch.zeros(B, 1, lat, lat, device=dev)
    mask[:, :, lat // 3:lat // 2, lat // 3:lat // 2] = 1
    batch = {"latent": torch.randn(B, 4, lat, lat, device=dev), "mask": mask,
             "attributes": torch.randint(1, 6, (B, 5), device=dev)}
    params = sum(p.numel() for mod in task.modules().values() for p in mod.parameters())
    if spec["what"] == "train":  # a short run: optimiser steps on one batch, the loss of each
        with measure() as m:
            r = probe_steps(task, batch, 1 + int(spec["repeats"]), device=dev)
        return {**r, "peak_mb": m["peak_mb"], "params": params}
    sched = make_scheduler("ddim", c.num_train_timesteps, "linear", "epsilon")
    for m in task.modules().values():
        m.eval()

    def once() -> None:
        with torch.no_grad():
            ctx = task.context(mask[:1], batch["attributes"][:1])
            cond = {"concat": mask[:1], **({"context": ctx} if ctx is not None else {})}
            sample(lambda x, t, **kw: task.unet(x, t, **kw), sched, (1, 4, lat, lat), int(c.ddim_steps),
                   generator=torch.Generator().manual_seed(0), device=dev, condition=cond, progress=False)
    once()  # warm-up
    with measure() as m:
        for _ in range(int(spec["repeats"])):
            once()
    return {"seconds": m["seconds"] / int(spec["repeats"]), "peak_mb": m["peak_mb"], "params": params}


def bench_bbox_ldm(args: argparse.Namespace) -> int:
    """Train step and one latent sample (``ddim_steps``) for configs 1, 2, 3 (the flattened mask) and 2 with pooled
    mask tokens, with ratios to config 1."""
    from lungsynth.config import get_config, parse_overrides

    overrides = parse_overrides(args.overrides)
    cfg = get_config(args.profile, overrides)
    size = int(args.size or cfg.data.size_2d)
    print(f"bbox-LDM bench ({cfg.profile}): {size}^2 slices (latent {size // 4}^2), U-Net "
          f"{tuple(cfg.bbox_ldm.unet_channels)}, batch {cfg.bbox_ldm.batch_size}, {cfg.bbox_ldm.ddim_steps} "
          f"sampling steps, repeats {args.repeats}; one process per number")
    # the paper's flattened mask for configs 1-3, and config 2 with the pooled mask tokens beside it
    variants = {"1": (1, "flat"), "2": (2, "flat"), "3": (3, "flat"), "2 pooled": (2, "pooled")}
    res: dict[tuple[str, str], dict[str, Any]] = {}
    for what in ("train", "sample"):
        for name, (k, context) in variants.items():
            spec = {"profile": cfg.profile, "overrides": {**overrides, "bbox_ldm.mask_context": context},
                    "size": size, "config": k, "what": what, "repeats": args.repeats}
            res[(name, what)] = run_child(CHILD, spec)
    for what, label in (("train", "train step"), ("sample", "one sample")):
        base = res[("1", what)]
        for name in variants:
            r = res[(name, what)]
            print(f"  {label:>10} config {name}: {r['seconds']:.3f} s ({r['seconds'] / base['seconds']:.2f}x), "
                  f"peak {r['peak_mb']:.0f} MB ({r['peak_mb'] / base['peak_mb']:.2f}x), "
                  f"{r['params'] / 1e6:.2f} M params")
    spec = {"profile": cfg.profile, "overrides": overrides, "size": size, "config": 3,
            "repeats": max(int(args.repeats), 5)}
    compare_precisions(CHILD, {"train step, config 3": {**spec, "what": "train"},
                               "one sample, config 3": {**spec, "what": "sample", "repeats": 1}})
    return 0
