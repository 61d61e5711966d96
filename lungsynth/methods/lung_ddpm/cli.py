"""``lungsynth lung-ddpm train|sample|evaluate`` (chapter 06).

    lungsynth lung-ddpm train    --profile smoke [--no-lung-layout] [--fresh]
    lungsynth lung-ddpm sample   --profile smoke [--no-aas] [--no-lung-layout] [--split S] [-n N] [--seed K] [--out DIR]
    lungsynth lung-ddpm evaluate --profile smoke [--no-aas] [--no-lung-layout] [--split S] [-n N] [--seed K]

Importing this module stays free of torch (``lungsynth --help``); the verbs import the model when they run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """``lungsynth lung-ddpm train|sample|evaluate --profile P [--no-aas] [--no-lung-layout]``."""
    from lungsynth.config import add_profile_argument

    p = sub.add_parser("lung-ddpm", help="chapter 06: Lung-DDPM, pixel-space 3D DDPM with anatomically aware sampling")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>")
    verbs.required = True
    for verb, text in (("train", "train (or resume) the model; --no-lung-layout trains the ablation"),
                       ("sample", "sample volumes for the evaluation split's layouts and write NIfTI"),
                       ("evaluate", "the ablation table: AAS / w/o AAS / w/o lung layout")):
        q = verbs.add_parser(verb, help=text)
        add_profile_argument(q)
        q.add_argument("--no-aas", action="store_true", help="sample without anatomically aware sampling")
        q.add_argument("--no-lung-layout", action="store_true", help="the model trained without the lung in its layout")
        if verb == "train":
            q.add_argument("--fresh", action="store_true", help="start over instead of resuming last.pt")
        if verb in ("sample", "evaluate"):
            q.add_argument("--split", default=None, help="split of the layouts/references (default lung_ddpm.eval_split)")
            q.add_argument("-n", type=int, default=None, help="number of volumes (default lung_ddpm.n_eval)")
            q.add_argument("--seed", type=int, default=0)
        if verb == "sample":
            q.add_argument("--out", default=None, help="output folder (default <run dir>/samples_<aas|no_aas>)")
        q.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    import json

    from lungsynth.config import get_config, parse_overrides
    from lungsynth.methods.lung_ddpm.evaluate import ABLATIONS, eval_volumes, evaluate
    from lungsynth.methods.lung_ddpm.sample import generate, load, save_volumes
    from lungsynth.methods.lung_ddpm.train import train

    cfg = get_config(args.profile, parse_overrides(args.overrides))
    variant = "no_lung_layout" if args.no_lung_layout else "layout"
    if args.verb == "train":
        if args.no_aas:
            print("note: AAS only changes sampling; --no-aas trains the same model")
        run = train(cfg, variant, fresh=args.fresh)
        print(f"trained Lung-DDPM ({variant}) in {run}")
        return 0
    if args.verb == "sample":
        model = load(cfg, variant)
        data = eval_volumes(cfg, args.split, cfg.lung_ddpm.n_eval if args.n is None else args.n)
        t0 = time.perf_counter()
        x = generate(model, data["layout"], data["ct"], aas=not args.no_aas, seed=args.seed, progress=True)
        out = Path(args.out) if args.out else model.run_dir / f"samples_{'no_aas' if args.no_aas else 'aas'}"
        files = save_volumes(out, cfg, x, data["scan_id"], data["layout"])
        print(f"{x.shape[0]} volumes in {time.perf_counter() - t0:.1f} s -> {out} ({len(files)} files)")
        return 0
    rows = [r for r, (v, a) in ABLATIONS.items()
            if (not args.no_lung_layout or v == "no_lung_layout") and (not args.no_aas or not a)]
    table = evaluate(cfg, rows, split=args.split, n=args.n, seed=args.seed, progress=True)
    print(json.dumps(table, indent=2))
    return 0
