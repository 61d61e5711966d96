"""``lungsynth autoencoder train|encode|evaluate`` and ``lungsynth bench vae`` (chapter 02).

    lungsynth autoencoder train  --kind vae3d --profile smoke [--run-dir D] [--fresh]
    lungsynth autoencoder encode --kind vae3d --profile smoke [--split train] [--run-dir D]
    lungsynth autoencoder evaluate --kind vae3d --profile smoke [--split val]
    lungsynth bench vae --size 256 --profile smoke
"""

from __future__ import annotations

import argparse
import json

KINDS = ("vae3d", "vqvae2d", "vae2d", "maskvae")  # lungsynth.autoencoders.KINDS, without importing torch


def register(sub: argparse._SubParsersAction) -> None:
    from lungsynth.config import add_profile_argument

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
    from lungsynth.autoencoders import train_autoencoder

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
    from lungsynth.autoencoders import ensure_autoencoder

    cfg = _cfg(args)
    return cfg, ensure_autoencoder(args.kind, cfg, args.run_dir, root=args.data_root)


def _encode(args: argparse.Namespace) -> int:
    from lungsynth.autoencoders import ensure_latents

    cfg, ae = _trained(args)
    splits = ("train", "val", "test") if args.split == "all" else (args.split,)
    for split in splits:
        out = ensure_latents(args.kind, cfg, split, args.run_dir, ae=ae, root=args.data_root)
        meta = json.loads((out / "index.json").read_text())
        print(f"{args.kind} {split}: {meta['n']} latents {meta['latent_shape']} (scale factor "
              f"{meta['scale_factor']:.4g}) -> {out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from lungsynth.autoencoders import evaluate_autoencoder

    cfg, ae = _trained(args)
    table = evaluate_autoencoder(ae, cfg, args.split, args.max_items, root=args.data_root)
    cols = [c for c in table.columns if c not in ("id",)]
    print(table[cols].groupby("method").mean(numeric_only=True).round(4).to_string())
    return 0
