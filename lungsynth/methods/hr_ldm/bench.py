"""``lungsynth bench hr-ldm``: what the histogram regulariser costs per training step, and one inpainting.

Each configuration runs in its own process (peak RSS never goes down within one); on CUDA the peak
is ``max_memory_allocated``. Untrained networks of the profile's sizes on random latents: speed and
memory do not depend on the weights.
"""

from __future__ import annotations

import argparse
from typing import Any

from lungsynth.runtime import compare_precisions, run_child

CHILD = "lungsynth.methods.hr_ldm.bench:_child"


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from lungsynth.config import get_config
    from lungsynth.engine import SimpleTask, probe_steps
    from lungsynth.methods.hr_ldm.model import (HrLdmNet, TruncatedDecoder, crop_side, hr_ldm_losses,
                                                make_schedulers, net_spec)
    from lungsynth.methods.hr_ldm.sample import HrLdm, inpaint_latent
    from lungsynth.autoencoders import build_autoencoder
    from lungsynth.runtime import device, measure

    cfg = get_config(spec["profile"], spec["overrides"])
    dev = device()
    torch.manual_seed(0)
    vae = build_autoencoder("vae3d", cfg).eval().requires_grad_(False).to(dev)
    side = int(spec["size"] or crop_side(cfg))
    lat = side // vae.downsample
    B = int(cfg.hr_ldm.batch_size)
    net = HrLdmNet(net_spec(cfg, vae.latent_channels)).to(dev)
    train_sched, sample_sched = make_schedulers(cfg)
    cond = torch.zeros(B, 3, lat, lat, lat, device=dev)
    q = lat // 4
    cond[:, 0, q:lat - q, q:lat - q, q:lat - q] = 1
    trunc = TruncatedDecoder(vae).to(dev)
    fshape = trunc(torch.zeros(1, vae.latent_channels, lat, lat, lat, device=dev)).shape[2:]
    batch = {"z0": torch.randn(B, vae.latent_channels, lat, lat, lat, device=dev), "mask": cond[:, :1], "cond": cond,
             "hist": torch.full((B, cfg.hr_ldm.hist_bins), 1.0 / cfg.hr_ldm.hist_bins, device=dev),
             "subtype": torch.arange(B, device=dev) % 3,
             "feat_weight": torch.nn.functional.interpolate(cond[:, :1], size=tuple(fshape))}
    what = spec["what"]
    params = sum(p.numel() for p in net.parameters())
    if what.startswith("train"):  # a short run: optimiser steps on one batch, the loss of each
        use = trunc if what == "train_hist" else None
        task = SimpleTask(net, lambda m, b: hr_ldm_losses(m, train_sched, b, use, cfg.hr_ldm.hist_weight,
                                                          cfg.hr_ldm.hist_bins), kind="hr-ldm-bench")
        with measure() as m:
            r = probe_steps(task, batch, 1 + int(spec["repeats"]), device=dev)
        return {**r, "peak_mb": m["peak_mb"], "side": side, "params": params}
    model = HrLdm(net.eval(), vae, sample_sched, cfg)

    def once() -> None:
        inpaint_latent(model, batch["z0"][:1], cond[:1], 0, batch["hist"][:1])
    once()  # warm-up
    with measure() as m:
        for _ in range(int(spec["repeats"])):
            once()
    return {"seconds": m["seconds"] / int(spec["repeats"]), "peak_mb": m["peak_mb"], "side": side, "params": params}


def bench_hr_ldm(args: argparse.Namespace) -> int:
    """Train step with vs without the histogram loss (ratio), and one inpainting (``ddim_steps`` steps)."""
    from lungsynth.config import get_config, parse_overrides

    overrides = parse_overrides(args.overrides)
    cfg = get_config(args.profile, overrides)
    print(f"HR-LDM bench ({cfg.profile}): U-Net {tuple(cfg.hr_ldm.unet_channels)}, batch {cfg.hr_ldm.batch_size}, "
          f"{cfg.hr_ldm.sampler} {cfg.hr_ldm.ddim_steps} steps, repeats {args.repeats}; one process per number")
    res = {}
    for what in ("train_no_hist", "train_hist", "inpaint"):
        spec = {"profile": cfg.profile, "overrides": overrides, "size": args.size, "what": what,
                "repeats": args.repeats}
        res[what] = r = run_child(CHILD, spec)
        print(f"  {what:14s} {r['seconds']:8.3f} s  peak {r['peak_mb']:9.1f} MB  crop {r['side']}^3  "
              f"params {r['params'] / 1e6:.2f}M", flush=True)
    a, b = res["train_hist"], res["train_no_hist"]
    print(f"ratio with / without histogram loss: time {a['seconds'] / b['seconds']:.3f}  "
          f"peak memory {a['peak_mb'] / b['peak_mb']:.3f}")
    spec = {"profile": cfg.profile, "overrides": overrides, "size": args.size, "repeats": max(int(args.repeats), 5)}
    compare_precisions(CHILD, {"train step (histogram)": {**spec, "what": "train_hist"},
                               "one inpainting": {**spec, "what": "inpaint", "repeats": 1}})
    return 0
