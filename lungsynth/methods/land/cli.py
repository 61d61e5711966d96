"""LAND (chapter 03): ``lungsynth land train|sample|evaluate``.

Importing this module (``lungsynth --help``) does not import torch: the verbs import the rooms they run.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

# lungsynth.methods.land.VARIANTS and SAMPLERS (model.py), repeated here without importing torch
VARIANTS: tuple[str, ...] = ("none", "nodule-only", "mask", "latentmask", "latentmask-texture")
SAMPLERS: tuple[str, ...] = ("ddim", "ddpm")


def _save_nifti(path: Path, vol: np.ndarray, spacing: float) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.nii.gz")
    nib.save(nib.Nifti1Image(vol.astype(np.float32), np.diag([spacing] * 3 + [1.0])), str(tmp))
    os.replace(tmp, path)


def _cmd_train(args: argparse.Namespace) -> int:
    from lungsynth.config import get_config, parse_overrides
    from lungsynth.methods.land.train import train

    cfg = get_config(args.profile, parse_overrides(args.overrides))
    if args.variant == "all" and args.run_dir:
        raise ValueError("--run-dir names one run: use it with a single --variant, or drop it for --variant all")
    for variant in (VARIANTS if args.variant == "all" else (args.variant,)):
        run = train(cfg, variant, args.run_dir, fresh=args.fresh)
        print(f"LAND {variant}: trained into {run}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from lungsynth.config import get_config, parse_overrides
    from lungsynth.methods.land.sample import load, sample
    from lungsynth.methods.land.train import heldout_conditions
    from lungsynth.nn.conditioning import move_nodule, resize_nodule, set_texture

    cfg = get_config(args.profile, parse_overrides(args.overrides))
    model = load(cfg, args.variant, args.run_dir)
    cond = None
    if args.variant != "none":
        conds = heldout_conditions(cfg, args.split, args.n)  # only the n it cycles through are read
        cond = conds[torch.arange(args.n) % len(conds)]
        if args.texture is not None:
            cond = set_texture(cond, args.texture)
        if args.move is not None:
            cond = move_nodule(cond, tuple(int(v) for v in args.move.split(",")))
        if args.resize is not None:
            cond = resize_nodule(cond, args.resize)
    out = sample(model, cond, args.n, sampler=args.sampler, steps=args.steps, seed=args.seed, progress=True)
    out_dir = Path(args.out) if args.out else model.run_dir / "samples"
    for i in range(out["ct_hu"].shape[0]):
        path = out_dir / f"land_{args.variant}_{out['sampler']}_s{args.seed}_{i:03d}_ct.nii.gz"
        _save_nifti(path, out["ct_hu"][i, 0].numpy(), cfg.data.spacing_3d_mm)
        if out["cond"] is not None:
            _save_nifti(path.with_name(path.name.replace("_ct.", "_cond.")), out["cond"][i, 0].numpy(),
                        cfg.data.spacing_3d_mm)
    print(f"LAND {args.variant}: {out['ct_hu'].shape[0]} volume(s) ({out['sampler']}, {out['steps']} steps, "
          f"{out['seconds']:.1f} s) written to {out_dir}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from lungsynth.config import get_config, parse_overrides
    from lungsynth.methods.land.evaluate import evaluate

    cfg = get_config(args.profile, parse_overrides(args.overrides))
    variants = VARIANTS if args.variant == "all" else (args.variant,)
    rows = evaluate(cfg, variants, n_samples=args.n, overrides=parse_overrides(args.overrides))
    for r in rows:
        print(json.dumps(r))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """``lungsynth land train|sample|evaluate``."""
    from lungsynth.config import add_profile_argument

    p = sub.add_parser("land", help="chapter 03: LAND 3D latent diffusion with anatomical masks")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>")
    verbs.required = True
    t = verbs.add_parser("train", help="train a variant (resumes a killed run)")
    t.add_argument("--variant", default="latentmask-texture", choices=VARIANTS + ("all",))
    t.add_argument("--run-dir", default=None)
    t.add_argument("--fresh", action="store_true", help="ignore last.pt and start over")
    add_profile_argument(t)
    t.set_defaults(func=_cmd_train)
    s = verbs.add_parser("sample", help="sample volumes (held-out or edited masks) into NIfTI files")
    s.add_argument("--variant", default="latentmask-texture", choices=VARIANTS)
    s.add_argument("--n", type=int, default=1)
    s.add_argument("--sampler", default=None, choices=SAMPLERS)
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--split", default="test", choices=("train", "val", "test"), help="where the masks come from")
    s.add_argument("--texture", type=int, default=None, help="set every nodule's texture (1..5)")
    s.add_argument("--move", default=None, help="move the nodule by dz,dy,dx voxels")
    s.add_argument("--resize", type=float, default=None, help="scale the nodule by this factor")
    s.add_argument("--run-dir", default=None)
    s.add_argument("--out", default=None)
    add_profile_argument(s)
    s.set_defaults(func=_cmd_sample)
    e = verbs.add_parser("evaluate", help="Table 1: FID, MS-SSIM, peak memory per variant")
    e.add_argument("--variant", default="all", choices=VARIANTS + ("all",))
    e.add_argument("--n", type=int, default=None)
    add_profile_argument(e)
    e.set_defaults(func=_cmd_evaluate)
