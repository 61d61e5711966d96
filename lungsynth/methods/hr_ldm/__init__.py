"""Chapter 05 — HR-LDM: histogram-regularised latent inpainting of lung nodules by subtype.

No public code of the paper exists; this package is the course's reference implementation of its
Algorithm 1 (training, :mod:`.model`) and Algorithm 2 (inpainting, :mod:`.inpaint`), with the
histograms in :mod:`.histogram` and the API and CLI verbs in :mod:`.api`.

What later chapters (08-11) call to put nodules of a chosen subtype into real CT::

    from lungsynth.methods import hr_ldm
    model = hr_ldm.load(cfg, hr_ldm.ensure_trained(cfg))          # HR-LDM (hist_loss=False: ablation)
    library = hr_ldm.NoduleLibrary.from_prepared(cfg, "train")     # real shapes + target histograms
    res = hr_ldm.inpaint_volume(model, ct_hu, lung, subtype=2, spacing_mm=cfg.data.spacing_3d_mm,
                                library=library, size_range_mm=(10, 20), seed=0)
    res.ct_hu, res.nodule_mask, res.hrmask, res.centre          # new volume [D,H,W] and its labels

Command line: ``lungsynth hr-ldm train|inpaint|evaluate --profile P [--no-hist-loss]``.

Names are imported lazily (PEP 562) so ``lungsynth --help`` does not import torch.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

_EXPORTS: dict[str, tuple[str, ...]] = {
    "api": ("train", "ensure_trained", "load", "evaluate", "eval_items", "generate_for_eval", "metrics_for",
            "train_crops"),
    "histogram": ("SUBTYPES", "HIST_BINS", "HIST_RANGE_HU", "bin_centres", "hu_histogram", "soft_histogram",
                  "js_divergence", "js_divergence_np", "feature_histograms", "validate_histogram",
                  "validate_subtype", "validate_mask_in_lung"),
    "inpaint": ("SIZE_BINS_MM", "HrLdm", "InpaintResult", "NoduleLibrary", "candidate_centres", "sample_centre",
                "place_mask", "inpaint_crops", "inpaint_latent", "inpaint_volume"),
    "model": ("HistogramEncoder", "HrLdmNet", "HrLdmTask", "LatentCache", "TruncatedDecoder", "build_latent_cache",
              "crop_side", "hr_ldm_losses", "make_schedulers", "mask_to_latent", "net_spec", "default_run_dir",
              "run_name"),
    "plots": ("plot_soft_histogram", "plot_inpaint_steps", "plot_subtype_size_grid", "plot_histograms",
              "subtype_size_grid"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE) + ["register"]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__


def _run(verb: str):
    def call(args: argparse.Namespace) -> int:
        from lungsynth.methods.hr_ldm import api

        return getattr(api, f"_cmd_{verb}")(args)
    return call


def register(sub: argparse._SubParsersAction) -> None:
    """``lungsynth hr-ldm train|inpaint|evaluate``."""
    from lungsynth.config import add_profile_argument

    p = sub.add_parser("hr-ldm", help="chapter 05: HR-LDM, histogram-regularised latent inpainting of nodules")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>")
    verbs.required = True
    t = verbs.add_parser("train", help="train HR-LDM (Algorithm 1); --no-hist-loss trains the MAISI-DDPM ablation")
    t.add_argument("--no-hist-loss", action="store_true", help="drop the histogram regulariser (ablation)")
    t.add_argument("--fresh", action="store_true", help="start over instead of resuming")
    add_profile_argument(t)
    t.set_defaults(func=_run("train"))
    i = verbs.add_parser("inpaint", help="inpaint a nodule of a chosen subtype into a prepared scan (Algorithm 2)")
    i.add_argument("--no-hist-loss", action="store_true", help="use the ablation model")
    i.add_argument("--subtype", default="solid", help="0/solid, 1/part-solid or 2/ground-glass")
    i.add_argument("--size-mm", default=None, help="diameter range of the drawn shape in mm, e.g. 10,20")
    i.add_argument("--split", default="test", help="which split's scan to inpaint into")
    i.add_argument("--index", type=int, default=0, help="which scan of the split")
    i.add_argument("--include-rim", action="store_true", help="allow sub-pleural centres")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--out", default=None, help="output folder (default <run dir>/inpainted)")
    add_profile_argument(i)
    i.set_defaults(func=_run("inpaint"))
    e = verbs.add_parser("evaluate", help="ablation table: per-subtype JSD, 2.5D FID/KID/MMD, delta HU outside")
    add_profile_argument(e)
    e.set_defaults(func=_run("evaluate"))
