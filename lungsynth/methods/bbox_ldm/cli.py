"""``lungsynth bbox-ldm train|sample|evaluate``: the subcommand and its verbs (train; sample: arrays + a PNG grid
with red boxes; evaluate: Table 2 and the samplers' box placement)."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def register(sub: argparse._SubParsersAction) -> None:
    """``lungsynth bbox-ldm train|sample|evaluate``."""
    from lungsynth.config import add_profile_argument

    p = sub.add_parser("bbox-ldm", help="chapter 04: 2D LDM with a nodule box mask and LIDC attributes")
    p.add_argument("verb", choices=("train", "sample", "evaluate"))
    p.add_argument("--config", type=int, choices=(1, 2, 3), default=3,
                   help="1: mask concat; 2: + mask cross-attention; 3: + attribute cross-attention (default 3)")
    p.add_argument("--lung", action="store_true",
                   help="train/sample: the lung-conditioned variant of configuration 3 (anatomical sampler only)")
    p.add_argument("--mask-context", choices=("flat", "pooled"), default=None,
                   help="configs 2, 3: the mask in cross-attention as the paper's one flattened vector (flat, the "
                        "default) or as pooled tokens (pooled; runs in ..._pooled)")
    p.add_argument("--sampler", choices=("paper", "anatomical"), default="paper",
                   help="sample: where boxes and attributes come from (default paper)")
    p.add_argument("--n", type=int, default=None, help="sample: how many slices (default cfg.sampling.n_samples)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-dir", default=None, help="default runs/<profile>/04_bbox_ldm_config<k>")
    p.add_argument("--fresh", action="store_true", help="train: start over instead of resuming")
    p.add_argument("--pretrained-vq", default=None, metavar="DIR",
                   help="a local diffusers VQModel folder (save_pretrained) to use, frozen, instead of chapter 02's")
    add_profile_argument(p)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from lungsynth.config import get_config, parse_overrides

    cfg = get_config(args.profile, parse_overrides(args.overrides))
    if args.pretrained_vq:
        cfg.bbox_ldm.pretrained_vq = str(args.pretrained_vq)
    if args.mask_context:
        cfg.bbox_ldm.mask_context = args.mask_context
    if args.verb == "train":
        return run_train(cfg, args)
    if args.verb == "sample":
        return run_sample(cfg, args)
    return run_evaluate(cfg, args)


def run_train(cfg, args: argparse.Namespace) -> int:
    from lungsynth.methods.bbox_ldm.train import train

    run_dir = train(cfg, args.config, args.run_dir, fresh=args.fresh, lung=args.lung)
    print(f"bbox-ldm config {args.config}{' + lung' if args.lung else ''}: trained into {run_dir}")
    return 0


def run_sample(cfg, args: argparse.Namespace) -> int:
    from lungsynth.methods.bbox_ldm.evaluate import box_tissues, in_lung_rate, tissue_counts
    from lungsynth.methods.bbox_ldm.plots import save_grid
    from lungsynth.methods.bbox_ldm.sample import draw_conditions, load, to_hu
    from lungsynth.methods.bbox_ldm.train import ensure_trained, load_split

    if args.lung and args.sampler != "anatomical":
        raise SystemExit("the lung-conditioned variant needs the lung its box lies in: use --sampler anatomical")
    run_dir = ensure_trained(cfg, args.config, args.run_dir, lung=args.lung)
    model = load(cfg, args.config, run_dir, lung=args.lung)
    n = int(args.n or cfg.sampling.n_samples)
    draw = draw_conditions(cfg, args.sampler, n, args.seed)
    lungs = load_split(cfg, "train")["lungs"][draw.slice_index] if args.lung else None
    images = model.sample(draw.boxes, draw.attributes, lungs=lungs, seed=args.seed).numpy()
    # where each box falls, measured on the generated slice itself (its own classical lung mask)
    spacing = float(np.median(load_split(cfg, "train")["spacings"]))  # the pixel of the generated slices
    labels = box_tissues(to_hu(images[:, 0], cfg.bbox_ldm.hu_clip), draw.boxes, spacing)
    where = {"labels": labels, "inside_lung_rate": in_lung_rate(labels), "counts": tissue_counts(labels)}
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
          f"boxes on the generated lung: {where['inside_lung_rate']:.0%}")
    return 0


def run_evaluate(cfg, args: argparse.Namespace) -> int:
    from lungsynth.methods.bbox_ldm.evaluate import evaluate
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
