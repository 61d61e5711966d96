"""``lungsynth text2img train|sample --profile P [--pretrained DIR] [--guidance S]``."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from lungsynth.config import add_profile_argument

    p = sub.add_parser("text2img", help="chapter 07: text-to-image LDM of nodule ROIs")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>")
    verbs.required = True
    for verb, text in (("train", "train (or fine-tune a local Stable Diffusion U-Net)"),
                       ("sample", "generate ROIs for prompts of the test split, or --prompt")):
        v = verbs.add_parser(verb, help=text)
        add_profile_argument(v)
        v.add_argument("--pretrained", default=None, metavar="DIR",
                       help="a local diffusers Stable Diffusion folder (fine-tunes its U-Net with its CLIP encoder)")
        v.add_argument("--run-dir", default=None, help="default: runs/<profile>/07_text2img[_sd]")
        if verb == "train":
            v.add_argument("--steps", type=int, default=None, help="default: text2img.train_steps of the profile")
            v.add_argument("--fresh", action="store_true", help="start over instead of resuming")
        else:
            v.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (paper: 5)")
            v.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable)")
            v.add_argument("--n", type=int, default=8, help="number of ROIs when no --prompt is given")
            v.add_argument("--seed", type=int, default=0)
            v.add_argument("--out", default=None, help="folder for samples.npz and grid.png (default: the run dir)")
        v.set_defaults(func=_train if verb == "train" else _sample)


def _config(args):
    from lungsynth.config import get_config, parse_overrides

    return get_config(args.profile, parse_overrides(args.overrides))


def _train(args: argparse.Namespace) -> int:
    from lungsynth.methods.text2img import check_pipeline_folder
    from lungsynth.methods.text2img.train import train

    if args.pretrained:
        check_pipeline_folder(args.pretrained)
    run_dir = train(_config(args), args.pretrained, Path(args.run_dir) if args.run_dir else None, args.steps, args.fresh)
    print(f"trained: {run_dir}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    import numpy as np

    from lungsynth.methods.text2img import default_run_dir, generate, load, roi_dataset

    if not args.guidance > 0:
        raise SystemExit(f"--guidance {args.guidance:g}: expected a scale > 0 (the paper sweeps 5..60, best 5)")
    cfg = _config(args)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(cfg, args.pretrained)
    if args.prompt:
        from lungsynth.data.prompts import parse_prompt

        for prompt in args.prompt:  # the model knows the sentences it was trained on: anything else is an error
            parse_prompt(prompt)
        prompts = args.prompt
    else:
        test = roi_dataset(cfg, "test")
        prompts = [test[i % len(test)]["prompt"] for i in range(args.n)]
    model = load(cfg, run_dir, args.pretrained)
    images = generate(model, prompts, args.guidance, cfg.text2img.sample_steps, cfg.text2img.sampler, args.seed)
    out = Path(args.out or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / f"samples_g{args.guidance:g}.npz", images=images.numpy(), prompts=np.array(prompts))
    print(f"{len(prompts)} ROIs at guidance {args.guidance:g} -> {out / f'samples_g{args.guidance:g}.npz'}")
    return 0
