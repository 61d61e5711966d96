"""``lungsynth autoencoder train|encode|evaluate`` and ``lungsynth bench vae`` (chapter 02).

    lungsynth autoencoder train  --kind vae3d --profile smoke [--run-dir D] [--fresh]
    lungsynth autoencoder encode --kind vae3d --profile smoke [--split train] [--run-dir D]
    lungsynth autoencoder evaluate --kind vae3d --profile smoke [--split val]
    lungsynth bench vae --size 256 --profile smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

KINDS = ("vae3d", "vqvae2d", "vae2d", "maskvae")  # lungsynth.nn.autoencoders.KINDS, without importing torch


def register(sub: argparse._SubParsersAction) -> None:
    from lungsynth.cli import add_profile_argument

    p = sub.add_parser("autoencoder", help="chapter 02: train the autoencoders and cache latents")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>")
    verbs.required = True

    t = verbs.add_parser("train", help="train an autoencoder (resumes its run directory's last checkpoint)")
    t.add_argument("--kind", required=True, choices=KINDS)
    t.add_argument("--run-dir", default=None, help="default: runs/<profile>/02_<kind>")
    t.add_argument("--fresh", action="store_true", help="start over instead of resuming last.pt")
    t.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="stop (and checkpoint) after this many seconds; run again to continue")
    _data_root(t)
    add_profile_argument(t)
    t.set_defaults(func=_train)

    e = verbs.add_parser("encode", help="cache latent posteriors (mean, std) of a split")
    e.add_argument("--kind", required=True, choices=KINDS)
    e.add_argument("--split", default="train", choices=("train", "val", "test", "all"))
    e.add_argument("--run-dir", default=None, help="the autoencoder's run directory (default: runs/<profile>/02_<kind>)")
    _data_root(e)
    add_profile_argument(e)
    e.set_defaults(func=_encode)

    v = verbs.add_parser("evaluate", help="reconstruction metrics vs the x4 resampling baselines")
    v.add_argument("--kind", required=True, choices=KINDS)
    v.add_argument("--split", default="val", choices=("train", "val", "test"))
    v.add_argument("--run-dir", default=None)
    v.add_argument("--max-items", type=int, default=None)
    _data_root(v)
    add_profile_argument(v)
    v.set_defaults(func=_evaluate)


def _data_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help="a prepared dataset folder (default: the profile's, built when missing)")


def _cfg(args: argparse.Namespace):
    from lungsynth.config import get_config, parse_overrides

    return get_config(args.profile, parse_overrides(args.overrides))


def _train(args: argparse.Namespace) -> int:
    from lungsynth.nn.autoencoders import train_autoencoder

    cfg = _cfg(args)
    run_dir = train_autoencoder(args.kind, cfg, args.run_dir, fresh=args.fresh, time_budget_s=args.time_budget,
                                root=args.data_root)
    rec = json.loads((run_dir / "run.json").read_text())
    res = rec.get("results", {})
    print(f"{args.kind}: {res.get('steps')} steps ({res.get('stopped_by')}), scale factor "
          f"{res.get('scale_factor', float('nan')):.4g}, train {rec['timings_s'].get('train', 0):.1f} s -> {run_dir}")
    return 0


def _trained(args: argparse.Namespace):
    """(config, the autoencoder of ``args.kind``: loaded, or trained first when missing)."""
    from lungsynth.nn.autoencoders import ensure_autoencoder

    cfg = _cfg(args)
    return cfg, ensure_autoencoder(args.kind, cfg, args.run_dir, root=args.data_root)


def _encode(args: argparse.Namespace) -> int:
    from lungsynth.nn.autoencoders import ensure_latents

    cfg, ae = _trained(args)
    splits = ("train", "val", "test") if args.split == "all" else (args.split,)
    for split in splits:
        out = ensure_latents(args.kind, cfg, split, args.run_dir, ae=ae, root=args.data_root)
        meta = json.loads((out / "index.json").read_text())
        print(f"{args.kind} {split}: {meta['n']} latents {meta['latent_shape']} (scale factor "
              f"{meta['scale_factor']:.4g}) -> {out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from lungsynth.nn.ae_eval import evaluate_autoencoder

    cfg, ae = _trained(args)
    table = evaluate_autoencoder(ae, cfg, args.split, args.max_items, root=args.data_root)
    cols = [c for c in table.columns if c not in ("id",)]
    print(table[cols].groupby("method").mean(numeric_only=True).round(4).to_string())
    return 0


# ---------------------------------------------------------------------- bench


def _decode_probe(kind: str, size: int, mode: str, roi: int, profile: str | None) -> dict:
    """Run in a fresh process: decode a latent of a ``size`` volume whole or by sliding window."""
    import resource
    import time

    import torch

    from lungsynth.config import get_config
    from lungsynth.nn.autoencoders import build_autoencoder

    torch.manual_seed(0)
    cfg = get_config(profile)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ae = build_autoencoder(kind, cfg).eval().to(dev)
    z = torch.randn(1, *ae.latent_shape(size), device=dev)
    rss_before = _rss_mb()
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
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "seconds": seconds, "peak_mb": peak, "above_start_mb": peak - rss_before, "device": "cpu",
            "shape": list(out.shape)}


def _rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_vae(args: argparse.Namespace) -> int:
    """Train-step time of the 3D KL-VAE, and peak memory of decoding a ``--size``^3 volume whole
    versus by sliding window, each decode in its own process (peak RSS never goes down)."""
    import time

    import torch

    from lungsynth.config import get_config, parse_overrides
    from lungsynth.engine import Trainer
    from lungsynth.nn.ae_training import AutoencoderTask

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
    for mode in ("whole", "sliding"):
        cmd = [sys.executable, "-m", "lungsynth.autoencoders_cli", "_decode_probe", "vae3d", str(size), mode, str(roi),
               cfg.profile]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
        if proc.returncode != 0:
            results[mode] = None
            print(f"decode {size}^3 {mode}: failed ({proc.stderr.strip().splitlines()[-1] if proc.stderr else 'killed'})")
            continue
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[mode]
        print(f"decode {size}^3 {mode:7s}{'' if mode == 'whole' else f' (window {roi}^3)'}: {r['seconds']:.2f} s, "
              f"peak {r['peak_mb']:.0f} MB ({r['above_start_mb']:.0f} MB above the model) on {r['device']}")
    if results.get("whole") and results.get("sliding"):
        w, s = results["whole"], results["sliding"]
        print(f"whole / sliding: peak memory x{w['peak_mb'] / s['peak_mb']:.2f} "
              f"(above the model x{w['above_start_mb'] / max(s['above_start_mb'], 1e-6):.2f}), "
              f"time x{w['seconds'] / s['seconds']:.2f}")
    return 0


if __name__ == "__main__" and len(sys.argv) >= 2 and sys.argv[1] == "_decode_probe":
    _, _, kind_, size_, mode_, roi_, profile_ = sys.argv
    print(json.dumps(_decode_probe(kind_, int(size_), mode_, int(roi_), profile_)))
