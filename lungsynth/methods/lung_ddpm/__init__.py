"""Chapter 06 — Lung-DDPM: a pixel-space 3D DDPM with anatomically aware sampling (AAS).

Lung-DDPM generates a whole CT volume ``x`` [B, 1, S, S, S] (course scale [0, 1], trained in [-1, 1])
from a *semantic layout* ``y`` [B, 1, S, S, S] with values 0 (background), 1 (lung) and 2 (nodule):

- training (paper Alg. 1): ``x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps``; the 3D U-Net (MONAI
  ``DiffusionModelUNet`` with residual and attention blocks, through
  :func:`lungsynth.nn.unets.diffusion_unet`) reads ``cat[x_t, onehot(y)]`` and predicts ``eps``; the
  loss is ``|eps - eps_theta(x_t, y, t)|_1``; cosine schedule with T = 250; EMA 0.995 (the engine's
  :class:`~lungsynth.engine.EMA`); sampling uses the EMA weights.
- sampling with AAS (paper Alg. 2): after each reverse step
  ``x_{t-1} = m_l * x_{t-1}^model + m_e * q(x_ref, t-1)`` with ``m_l`` the lung (lung or nodule in the
  layout), ``m_e = 1 - m_l`` and ``q(x_ref, t-1)`` the reference CT forward-diffused to t-1 (the
  shared hook :func:`lungsynth.diffusion.samplers.anatomically_aware`), for every step with
  ``t <= blend_from``. At the end (t-1 = -1 means the clean data) the volume equals the reference
  outside the lungs exactly.

Ablations (the paper's Table IV): sampling without AAS (``aas=False``, same weights) and a model
trained without the lung in its layout (variant ``"no_lung_layout"``: lung voxels become background,
the layout has background and nodule only).

Public API (chapters 08-11)::

    model = load(cfg, variant="layout")          # trains first when the run has no final checkpoint
    x = model.sample(layout, reference, generator=torch.Generator().manual_seed(0))
    # layout [B or 1, 1, S, S, S] in {0, 1, 2}; reference [B or 1, 1, S, S, S] in [0, 1]; x in [0, 1]

Metrics (:func:`evaluate`): FID and MMD on 3D chest-CT features (:mod:`lungsynth.eval`), MSE inside
the lungs against the paired real volume, and :func:`seam_ratio` (gradient magnitude in a thin shell
across the lung boundary, sample over real).

Modules: :mod:`.layout` (layout, encodings, input checks), :mod:`.model` (U-Net, schedule, engine task,
``train`` / ``load`` / ``LungDDPM.sample``), :mod:`.evaluation` (metrics, ablation table, figures),
:mod:`.bench` (``lungsynth bench lung-ddpm``); this package re-exports them and holds the CLI.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from lungsynth.methods.lung_ddpm.evaluation import (ABLATIONS, boundary_shell, eval_volumes, evaluate,
                                                    figure_consecutive_slices, figure_side_by_side, generate,
                                                    gradient_magnitude, metrics, save_volumes, seam_ratio)
from lungsynth.methods.lung_ddpm.layout import (ENCODINGS, LAYOUT_LABELS, check_layout, check_reference,
                                                generation_mask, layout_channels, make_layout, n_layout_channels,
                                                to_model_scale, to_unit_scale)
from lungsynth.methods.lung_ddpm.model import (KIND, RUN_NAMES, VARIANTS, LungDDPM, build_scheduler, build_unet,
                                               check_variant, default_run_dir, ensure_trained, is_trained, load,
                                               make_trainer, model_config, sample, train, training_dataset)

__all__ = ["ABLATIONS", "ENCODINGS", "KIND", "LAYOUT_LABELS", "RUN_NAMES", "VARIANTS", "LungDDPM", "LungDdpmTask",
           "boundary_shell", "bench_lung_ddpm", "build_scheduler", "build_unet", "check_layout", "check_reference",
           "check_variant", "default_run_dir", "ensure_trained", "eval_volumes", "evaluate",
           "figure_consecutive_slices", "figure_side_by_side", "generate", "generation_mask", "gradient_magnitude",
           "is_trained", "layout_channels", "load", "make_layout", "make_trainer", "metrics", "model_config",
           "n_layout_channels", "register", "sample", "save_volumes", "seam_ratio", "to_model_scale",
           "to_unit_scale", "train", "training_dataset"]


def bench_lung_ddpm(args: argparse.Namespace) -> int:
    """``lungsynth bench lung-ddpm`` (see :mod:`lungsynth.methods.lung_ddpm.bench`)."""
    from lungsynth.methods.lung_ddpm.bench import bench_lung_ddpm as run

    return run(args)


def __getattr__(name: str) -> Any:
    # ``LungDdpmTask`` subclasses the engine's TrainTask; it is built on first use (PEP 562).
    if name == "LungDdpmTask":
        from lungsynth.methods.lung_ddpm.model import _task_class

        return _task_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- CLI


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
