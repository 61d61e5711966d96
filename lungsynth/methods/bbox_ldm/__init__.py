"""Chapter 04 — 2D latent diffusion with a nodule box mask and LIDC attributes (Mari et al.).

What later chapters call::

    from lungsynth.methods import bbox_ldm
    run = bbox_ldm.ensure_trained(cfg, 3)                    # runs/<profile>/04_bbox_ldm_config3
    model = bbox_ldm.load(cfg, 3)                            # U-Net + condition encoder + frozen VQ-VAE
    draw = bbox_ldm.draw_conditions(cfg, "anatomical", 16)   # boxes [16, 3] (y0, x0, side), attributes [16, 5]
    slices = model.sample(draw.boxes, draw.attributes, seed=0)   # [16, 1, H, W] in [0, 1] over hu_clip
    hu = bbox_ldm.to_hu(slices, cfg.bbox_ldm.hu_clip)
    table = bbox_ldm.evaluate(cfg)["table"]                  # FID on slices and 32x32 crops per config

Command line: ``lungsynth bbox-ldm train|sample|evaluate --config 1|2|3 --sampler paper|anatomical``.
"""

from __future__ import annotations

import argparse

# Public names -> the submodule defining them. Loaded on first use (PEP 562), so that
# ``lungsynth --help`` (which imports this package for ``register``) does not import torch.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("TISSUES", "AnatomicalMaskSampler", "MaskDraw", "PaperMaskSampler", "body_mask", "box_centres",
                     "classify_box", "classify_boxes", "inside_lung_rate", "tissue_counts"), "masks"),
    **dict.fromkeys(("ATTRIBUTES", "CONFIG_NAMES", "CONFIGS", "AttributeEmbedder", "ConditionEncoder", "box_masks",
                     "boxes_from_masks", "check_config", "mask_to_latent", "validate_attributes", "validate_boxes"),
                    "model"),
    **dict.fromkeys(("CROP", "SAMPLERS", "BboxLdm", "BboxLdmTask", "anatomical_sampler", "box_placement",
                     "compare_samplers", "crops", "default_run_dir", "draw_conditions", "ensure_trained", "evaluate",
                     "feature_net", "fid_2d", "load", "load_split", "paper_sampler", "run_name", "slice_dataset",
                     "to_hu", "train"), "pipeline"),
}
__all__ = [*_EXPORTS, "register"]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


def register(sub: argparse._SubParsersAction) -> None:
    """``lungsynth bbox-ldm train|sample|evaluate``."""
    from lungsynth.config import add_profile_argument

    p = sub.add_parser("bbox-ldm", help="chapter 04: 2D LDM with a nodule box mask and LIDC attributes")
    p.add_argument("verb", choices=("train", "sample", "evaluate"))
    p.add_argument("--config", type=int, choices=(1, 2, 3), default=3,
                   help="1: mask concat; 2: + mask cross-attention; 3: + attribute cross-attention (default 3)")
    p.add_argument("--sampler", choices=("paper", "anatomical"), default="paper",
                   help="sample: where boxes and attributes come from (default paper)")
    p.add_argument("--n", type=int, default=None, help="sample: how many slices (default cfg.sampling.n_samples)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-dir", default=None, help="default runs/<profile>/04_bbox_ldm_config<k>")
    p.add_argument("--fresh", action="store_true", help="train: start over instead of resuming")
    add_profile_argument(p)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from lungsynth.config import get_config, parse_overrides
    from lungsynth.methods.bbox_ldm.cli import run_sample, run_train, run_evaluate

    cfg = get_config(args.profile, parse_overrides(args.overrides))
    if args.verb == "train":
        return run_train(cfg, args)
    if args.verb == "sample":
        return run_sample(cfg, args)
    return run_evaluate(cfg, args)
