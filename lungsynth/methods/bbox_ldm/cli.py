"""The verbs of ``lungsynth bbox-ldm``: train, sample (arrays + a PNG grid with red boxes), evaluate."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np


def run_train(cfg, args: argparse.Namespace) -> int:
    from lungsynth.methods.bbox_ldm.pipeline import train

    run_dir = train(cfg, args.config, args.run_dir, fresh=args.fresh)
    print(f"bbox-ldm config {args.config}: trained into {run_dir}")
    return 0


def save_grid(images: np.ndarray, boxes: np.ndarray, path: Path, titles: list[str] | None = None) -> Path:
    """A PNG of [N, 1, H, W] slices with their condition boxes drawn in red (atomic write)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from lungsynth.methods.bbox_ldm.plots import show_slices

    fig = show_slices(images, boxes, titles=titles)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def run_sample(cfg, args: argparse.Namespace) -> int:
    from lungsynth.methods.bbox_ldm.pipeline import box_placement, draw_conditions, ensure_trained, load

    run_dir = ensure_trained(cfg, args.config, args.run_dir)
    model = load(cfg, args.config, run_dir)
    n = int(args.n or cfg.sampling.n_samples)
    draw = draw_conditions(cfg, args.sampler, n, args.seed)
    images = model.sample(draw.boxes, draw.attributes, seed=args.seed).numpy()
    where = box_placement(cfg, draw, args.seed)
    out = run_dir / f"samples_{args.sampler}_seed{args.seed}"
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "samples.tmp.npz"
    np.savez_compressed(tmp, images=images.astype(np.float32), boxes=draw.boxes, attributes=draw.attributes,
                        tissue=np.array(where["labels"]), hu_clip=np.array(cfg.bbox_ldm.hu_clip))
    os.replace(tmp, out / "samples.npz")
    save_grid(images, draw.boxes, out / "samples.png", titles=where["labels"])
    (out / "placement.json").write_text(json.dumps({"sampler": args.sampler, "n": n,
                                                    "inside_lung_rate": where["inside_lung_rate"],
                                                    "counts": where["counts"]}, indent=2))
    print(f"bbox-ldm config {args.config}: {n} slices ({args.sampler} sampler) in {out}; "
          f"boxes inside the lung: {where['inside_lung_rate']:.0%}")
    return 0


def run_evaluate(cfg, args: argparse.Namespace) -> int:
    from lungsynth.methods.bbox_ldm.pipeline import evaluate
    from lungsynth.runtime import write_json_atomic

    result = evaluate(cfg, seed=args.seed)
    from lungsynth.paths import run_dir

    path = run_dir(cfg.profile, "04_bbox_ldm_eval") / "table2.json"
    write_json_atomic(path, {"table": result["table"], "placement": result["placement"]})
    for row in result["table"]:
        print(f"config {row['config']} ({row['conditioning']}): FID slice {row['fid_slice']:.3g}, "
              f"FID crop {row['fid_crop']:.3g}")
    for name, p in result["placement"].items():
        print(f"{name} sampler: boxes inside the lung {p['inside_lung_rate']:.0%} {p['counts']}")
    print(f"written to {path}")
    return 0
