"""``lungsynth bench vae``: train-step time of the 3D KL-VAE and peak memory of whole versus
sliding-window decoding, each decode in a fresh process (peak RSS never goes down in one)."""

from __future__ import annotations

import argparse
from typing import Any

from lungsynth.runtime import compare_precisions, current_rss_mb, peak_rss_mb, run_child

CHILD = "lungsynth.autoencoders.bench:_child"


def _decode_probe(kind: str, size: int, mode: str, roi: int, profile: str | None) -> dict:
    """Run in a fresh process: decode a latent of a ``size`` volume whole or by sliding window."""
    import time

    import torch

    from lungsynth.config import get_config
    from lungsynth.autoencoders.model import build_autoencoder

    torch.manual_seed(0)
    cfg = get_config(profile)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ae = build_autoencoder(kind, cfg).eval().to(dev)
    z = torch.randn(1, *ae.latent_shape(size), device=dev)
    rss_before = current_rss_mb()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    t0 = time.perf_counter()
    with torch.no_grad():
        out = ae.decode(z, roi_size=None if mode == "whole" else roi)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        return {"mode": mode, "seconds": seconds, "peak_mb": peak, "above_start_mb": peak - base,
                "device": "cuda", "shape": list(out.shape)}
    peak = peak_rss_mb()
    return {"mode": mode, "seconds": seconds, "peak_mb": peak, "above_start_mb": peak - rss_before, "device": "cpu",
            "shape": list(out.shape)}


def _child(spec: dict[str, Any]) -> dict:
    """In a fresh process: a short vae3d training run on random cubes (``what="train"``), or one decode."""
    if spec["what"] != "train":
        return _decode_probe("vae3d", int(spec["size"]), spec["what"], int(spec["roi"]), spec["profile"])
    import torch

    from lungsynth.autoencoders.train import AutoencoderTask
    from lungsynth.config import get_config
    from lungsynth.engine import probe_steps

    torch.manual_seed(0)
    cfg = get_config(spec["profile"], spec.get("overrides") or {})
    patch, batch = int(cfg.autoencoders.patch_3d), int(cfg.autoencoders.batch_size)
    images = torch.rand(batch, 1, patch, patch, patch, generator=torch.Generator().manual_seed(0))
    return probe_steps(AutoencoderTask("vae3d", cfg), {"image": images}, 1 + int(spec["repeats"]),
                       lr=float(cfg.autoencoders.lr))


def bench_vae(args: argparse.Namespace) -> int:
    """Train-step time of the 3D KL-VAE, and peak memory of decoding a ``--size``^3 volume whole
    versus by sliding window, each decode in its own process (peak RSS never goes down)."""
    import time

    import torch

    from lungsynth.config import get_config, parse_overrides
    from lungsynth.engine import Trainer
    from lungsynth.autoencoders.train import AutoencoderTask

    cfg = get_config(args.profile, parse_overrides(args.overrides))
    size = int(args.size or 256)
    if size % 4:
        raise ValueError(f"--size must be a multiple of 4 (the VAE compresses x4), got {size}")
    roi = int(cfg.autoencoders.sliding_roi)
    if roi >= size:
        roi = max(4, (size // 2) // 4 * 4)
    patch = int(cfg.autoencoders.patch_3d)
    batch = int(cfg.autoencoders.batch_size)

    # Step time: difference of two fits (1 and 1 + repeats steps) so set-up cost cancels.
    g = torch.Generator().manual_seed(0)
    data = [{"image": torch.rand(1, patch, patch, patch, generator=g)} for _ in range(4)]
    times = []
    for n in (1, 1 + int(args.repeats)):
        task = AutoencoderTask("vae3d", cfg)
        t0 = time.perf_counter()
        Trainer.from_config(cfg.engine, None, max_steps=n, batch_size=batch, lr=1e-4, progress=False,
                            checkpoint_every=None).fit(task, data)
        times.append(time.perf_counter() - t0)
    step_s = (times[1] - times[0]) / int(args.repeats)
    print(f"vae3d train step (patch {patch}^3, batch {batch}, channels {tuple(cfg.autoencoders.vae3d_channels)}, "
          f"perceptual {cfg.autoencoders.perceptual_network}): {step_s:.3f} s "
          f"(adversarial term {'on' if cfg.autoencoders.adv_warmup_steps < 2 else 'in warm-up'})")

    results = {}
    decode = {"profile": cfg.profile, "size": size, "roi": roi}
    for mode in ("whole", "sliding"):
        try:
            results[mode] = r = run_child(CHILD, {**decode, "what": mode})
        except RuntimeError as exc:
            results[mode] = None
            print(f"decode {size}^3 {mode}: failed ({str(exc).strip().splitlines()[-1]})")
            continue
        print(f"decode {size}^3 {mode:7s}{'' if mode == 'whole' else f' (window {roi}^3)'}: {r['seconds']:.2f} s, "
              f"peak {r['peak_mb']:.0f} MB ({r['above_start_mb']:.0f} MB above the model) on {r['device']}")
    if results.get("whole") and results.get("sliding"):
        w, s = results["whole"], results["sliding"]
        print(f"whole / sliding: peak memory x{w['peak_mb'] / s['peak_mb']:.2f} "
              f"(above the model x{w['above_start_mb'] / max(s['above_start_mb'], 1e-6):.2f}), "
              f"time x{w['seconds'] / s['seconds']:.2f}")
    compare_precisions(CHILD, {"vae3d train step": {"profile": cfg.profile, "overrides": parse_overrides(args.overrides),
                                                    "what": "train", "repeats": max(int(args.repeats), 5)},
                               f"decode {size}^3 whole": {**decode, "what": "whole"}})
    return 0
