"""``lungsynth bench hr-ldm``: what the histogram regulariser costs per training step, and one inpainting.

Each configuration runs in its own process (peak RSS never goes down within one); on CUDA the peak
is ``max_memory_allocated``. Untrained networks of the profile's sizes on random latents: speed and
memory do not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

TAG = "HRLDMJSON"


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from lungsynth.runtime import measure
    from lungsynth.config import get_config
    from lungsynth.methods.hr_ldm.model import (HrLdmNet, TruncatedDecoder, crop_side, hr_ldm_losses,
                                                make_schedulers, net_spec)
    from lungsynth.methods.hr_ldm.sample import HrLdm, inpaint_latent
    from lungsynth.autoencoders import build_autoencoder
    from lungsynth.runtime import device

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
    if what.startswith("train"):
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        use = trunc if what == "train_hist" else None

        def once() -> None:
            out = hr_ldm_losses(net, train_sched, batch, use, cfg.hr_ldm.hist_weight, cfg.hr_ldm.hist_bins)
            out["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        model = HrLdm(net.eval(), vae, sample_sched, cfg)

        def once() -> None:
            inpaint_latent(model, batch["z0"][:1], cond[:1], 0, batch["hist"][:1])
    once()  # warm-up
    with measure() as m:
        for _ in range(int(spec["repeats"])):
            once()
    return {"seconds": m["seconds"] / int(spec["repeats"]), "peak_mb": m["peak_mb"], "side": side,
            "params": sum(p.numel() for p in net.parameters())}


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
        code = (f"import json, sys; from lungsynth.methods.hr_ldm.bench import _child; "
                f"print('{TAG}' + json.dumps(_child(json.loads(sys.argv[1]))))")
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(TAG)]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"bench process for {what} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        res[what] = r = json.loads(lines[-1][len(TAG):])
        print(f"  {what:14s} {r['seconds']:8.3f} s  peak {r['peak_mb']:9.1f} MB  crop {r['side']}^3  "
              f"params {r['params'] / 1e6:.2f}M", flush=True)
    a, b = res["train_hist"], res["train_no_hist"]
    print(f"ratio with / without histogram loss: time {a['seconds'] / b['seconds']:.3f}  "
          f"peak memory {a['peak_mb'] / b['peak_mb']:.3f}")
    return 0
