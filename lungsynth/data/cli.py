"""``lungsynth data ...``: phantom, prepare, default, nodule-table."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from lungsynth.config import add_profile_argument

    p = sub.add_parser("data", help="chapter 01: LIDC-IDRI through pylidc, the phantom default, prepared data")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>")
    verbs.required = True

    ph = verbs.add_parser("phantom", help="render phantom chest CT on real LIDC scans' geometry, as DICOM")
    ph.add_argument("--scans", default="12",
                    help="a count of default scans, or comma-separated patient ids / scan ids "
                         "(LIDC-IDRI-0078, LIDC-IDRI-0957_s698, or s698 for pylidc scan id 698)")
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--out", required=True, type=Path, help="DICOM root to write (pylidc layout)")
    ph.add_argument("--noise-hu", type=float, default=20.0)
    ph.add_argument("--render-matrix", type=int, default=128)
    ph.add_argument("--force", action="store_true", help="re-render series that exist")
    ph.add_argument("--workers", type=int, default=None, help="scans rendered side by side (default: one per core, "
                                                              "at most 4)")
    ph.set_defaults(func=cmd_phantom)

    pr = verbs.add_parser("prepare", help="DICOM -> isotropic NIfTI, masks, views, manifest, splits")
    pr.add_argument("--dicom-root", required=True, type=Path, help="LIDC-IDRI download or phantom root (read only)")
    pr.add_argument("--out", required=True, type=Path, help="prepared dataset folder")
    pr.add_argument("--scans", default=None,
                    help="comma-separated patient ids / scan ids, e.g. LIDC-IDRI-0078,s698 (default: all under the root)")
    pr.add_argument("--force", action="store_true", help="redo scans already prepared")
    pr.add_argument("--lung-mask", default="classical", choices=("classical", "auto", "lungmask"))
    pr.add_argument("--workers", type=int, default=None, help="scans prepared side by side (default: one per core, "
                                                              "at most 4)")
    add_profile_argument(pr)
    pr.set_defaults(func=cmd_prepare)

    de = verbs.add_parser("default", help="the embedded default for a profile (phantom + prepare), idempotent")
    add_profile_argument(de)
    de.set_defaults(func=cmd_default)

    nt = verbs.add_parser("nodule-table", help="recompute the table of every LIDC nodule (data/lidc_nodules.csv)")
    nt.add_argument("--out", type=Path, default=None, help="default: the repository's data/lidc_nodules.csv")
    nt.add_argument("--limit", type=int, default=None, help="only the first N scans (for a quick look)")
    nt.set_defaults(func=cmd_nodule_table)


def _scan_list(text: str | None) -> list[str | int] | None:
    if text is None:
        return None
    out: list[str | int] = []
    for tok in (t.strip() for t in text.split(",")):
        if tok.isdigit():
            out.append(int(tok))
        elif tok[:1] in "sS" and tok[1:].isdigit():
            out.append(int(tok[1:]))
        elif tok:
            out.append(tok)
    return out


def _config(args: argparse.Namespace):
    from lungsynth.config import get_config, parse_overrides

    return get_config(args.profile, parse_overrides(args.overrides))


def cmd_phantom(args: argparse.Namespace) -> int:
    from lungsynth.data.phantom import make_phantom

    scans = int(args.scans) if args.scans.strip().isdigit() else _scan_list(args.scans)
    t0 = time.perf_counter()
    infos = make_phantom(args.out, scans, seed=args.seed, noise_hu=args.noise_hu,
                         render_matrix=args.render_matrix, force=args.force, workers=args.workers)
    print(f"{len(infos)} phantom scans in {args.out} ({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from lungsynth.data.preprocess import prepare

    cfg = _config(args)
    t0 = time.perf_counter()
    out = prepare(args.dicom_root, args.out, cfg, scans=_scan_list(args.scans), force=args.force,
                  lung_method=args.lung_mask, workers=args.workers)
    print(f"prepared dataset in {out} ({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_default(args: argparse.Namespace) -> int:
    from lungsynth.data.datasets import ensure_prepared

    t0 = time.perf_counter()
    out = ensure_prepared(_config(args))
    print(f"prepared dataset ready in {out} ({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_nodule_table(args: argparse.Namespace) -> int:
    from lungsynth.data.nodule_table import build_nodule_table, default_table_path

    out = args.out or default_table_path()
    t0 = time.perf_counter()
    df = build_nodule_table(limit=args.limit, out=out)
    print(f"{len(df)} nodules -> {out} ({time.perf_counter() - t0:.1f} s)")
    return 0
