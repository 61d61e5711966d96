"""``lungsynth downstream seg|cls --profile P --synthetic D1,D2 --ratio R``.

The bar over the trainings is drawn even when stderr is not a terminal (a log under ``nohup``), where it is the
only sign of progress in runs of an hour or more."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``lungsynth downstream seg|cls``."""
    from lungsynth.config import add_profile_argument

    p = sub.add_parser("downstream", help="chapters 10-11: segmentation and classification with synthetic data")
    verbs = p.add_subparsers(dest="task", metavar="{seg,cls}")
    verbs.required = True
    seg = verbs.add_parser("seg", help="chapter 10: AttentionUnet, real only vs real + synthetic at ratios")
    cls = verbs.add_parser("cls", help="chapter 11: DenseNet121 subtype / scarcity / malignancy")
    for q in (seg, cls):
        q.add_argument("--synthetic", default=None,
                       help="synthetic dataset folders, comma-separated, each compared as its own arms (built "
                            "with `lungsynth synth --conditions validation` for seg in course / full, `sampler` "
                            "otherwise); default: real only")
        q.add_argument("--runs", type=int, default=None, help="independent runs (default cfg.downstream.n_runs)")
        q.add_argument("--real-root", default=None, help="real prepared dataset (default: the profile's)")
        q.add_argument("--out", default=None, help="results folder (default runs/<profile>/1N_downstream_<task>)")
        add_profile_argument(q)
        q.set_defaults(func=_main)
    for q in (seg, cls):
        q.add_argument("--ratio", default=None,
                       help="synthetic ratio(s), comma-separated: synthetic count = ratio x real count "
                            "(seg default cfg.downstream.synthetic_ratios; cls: adds the ratio experiment)")
    seg.add_argument("--setting", choices=("volume", "crop", "both"), default="both")
    cls.add_argument("--experiments", default="subtype,scarcity,malignancy",
                     help="comma-separated: subtype, scarcity, malignancy, ratio")


def _ratios(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(r) for r in text.split(",") if r.strip()]
    except ValueError as exc:
        raise ValueError(f"--ratio {text!r}: expected numbers like 0,0.5,1") from exc


def _main(args: argparse.Namespace) -> int:
    from lungsynth import paths
    from lungsynth.config import get_config, parse_overrides

    cfg = get_config(args.profile, parse_overrides(args.overrides))
    if args.task == "seg":
        from lungsynth.downstream.metrics import mean_pm_std
        from lungsynth.downstream.segmentation import METRICS, SETTINGS, run_segmentation

        out = args.out or paths.run_dir(cfg.profile, "10_downstream_seg")
        settings = SETTINGS if args.setting == "both" else (args.setting,)
        res = run_segmentation(cfg, args.synthetic, settings=settings, ratios=_ratios(args.ratio), n_runs=args.runs,
                               real_root=args.real_root, out=out, progress=True)
        print(mean_pm_std(res.table, METRICS).to_string(index=False))
    else:
        from lungsynth.downstream.classification import run_classification

        out = args.out or paths.run_dir(cfg.profile, "11_downstream_cls")
        exps = [e.strip() for e in args.experiments.split(",") if e.strip()]
        if args.ratio is not None and "ratio" not in exps:
            exps.append("ratio")
        res = run_classification(cfg, args.synthetic, experiments=exps, n_runs=args.runs, ratios=_ratios(args.ratio),
                                 real_root=args.real_root, out=out, progress=True)
        for name in ("subtype_table", "scarcity_table", "malignancy_table", "ratio_table"):
            t = getattr(res, name)
            if len(t):
                print(f"\n{name}:\n{t.to_string(index=False)}")
    print(f"\nresults in {out} ({res.seconds:.0f} s)")
    return 0
