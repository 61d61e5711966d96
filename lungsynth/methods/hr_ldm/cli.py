"""``lungsynth hr-ldm train|inpaint|evaluate`` (chapter 05).

    lungsynth hr-ldm train    --profile smoke [--no-hist-loss] [--fresh]
    lungsynth hr-ldm inpaint  --profile smoke [--subtype ground-glass] [--size-mm 10,20] [--split test] [--index 0]
    lungsynth hr-ldm evaluate --profile smoke

Importing this module does not import torch: each verb imports the rooms it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path


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
    t.set_defaults(func=_cmd_train)
    i = verbs.add_parser("inpaint", help="inpaint a nodule of a chosen subtype into a prepared scan (Algorithm 2)")
    i.add_argument("--no-hist-loss", action="store_true", help="use the ablation model")
    i.add_argument("--subtype", default="solid", help="0/solid, 1/part-solid or 2/ground-glass")
    i.add_argument("--size-mm", default=None, help="diameter range of the drawn shape in mm, e.g. 10,20")
    i.add_argument("--split", default="test", help="which split's scan to inpaint into")
    i.add_argument("--index", type=int, default=0, help="which scan of the split")
    i.add_argument("--subpleural", action="store_true", help="centre the nodule in the sub-pleural rim (clipped at the pleura)")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--out", default=None, help="output folder (default <run dir>/inpainted)")
    add_profile_argument(i)
    i.set_defaults(func=_cmd_inpaint)
    e = verbs.add_parser("evaluate", help="ablation table: per-subtype JSD, 2.5D FID/KID/MMD, delta HU outside")
    add_profile_argument(e)
    e.set_defaults(func=_cmd_evaluate)


def _parse_subtype(s: str) -> int:
    from lungsynth.methods.hr_ldm.model import SUBTYPES

    if s in SUBTYPES:
        return SUBTYPES.index(s)
    try:
        return int(s)
    except ValueError:
        raise ValueError(f"subtype {s!r}: use 0/solid, 1/part-solid or 2/ground-glass") from None


def _cmd_train(args: argparse.Namespace) -> int:
    from lungsynth.config import get_config, parse_overrides
    from lungsynth.methods.hr_ldm.train import train

    cfg = get_config(args.profile, parse_overrides(args.overrides))
    run_dir = train(cfg, not args.no_hist_loss, fresh=args.fresh)
    print(run_dir)
    return 0


def _cmd_inpaint(args: argparse.Namespace) -> int:
    import json

    import nibabel as nib
    import numpy as np

    from lungsynth.config import get_config, parse_overrides
    from lungsynth.data.datasets import VolumeDataset, ensure_prepared
    from lungsynth.methods.hr_ldm.model import SUBTYPES, js_divergence_np, unit_to_hu
    from lungsynth.methods.hr_ldm.sample import NoduleLibrary, inpaint_volume, load
    from lungsynth.methods.hr_ldm.train import default_run_dir, ensure_trained
    from lungsynth.runtime import write_json_atomic

    cfg = get_config(args.profile, parse_overrides(args.overrides))
    hist = not args.no_hist_loss
    ensure_prepared(cfg)
    model = load(cfg, ensure_trained(cfg, hist), hist)
    library = NoduleLibrary.from_prepared(cfg, "train")
    ds = VolumeDataset(cfg, args.split, keys=("ct", "lung", "label"))
    if len(ds) == 0:
        raise ValueError(f"the {args.split} split has no scans; use --split train|val|test")
    index = int(args.index) % len(ds)
    item = ds[index]
    healthy = isinstance(ds.table.iloc[index].get("healthy"), str)  # phantom: its healthy twin, as the paper
    ct = unit_to_hu(VolumeDataset(cfg, args.split, keys=("healthy",))[index]["healthy"][0].numpy() if healthy
                    else item["ct"][0].numpy(), cfg)
    size = tuple(float(v) for v in args.size_mm.split(",")) if args.size_mm else None
    res = inpaint_volume(model, ct, item["lung"][0].numpy(), _parse_subtype(args.subtype),
                         spacing_mm=cfg.data.spacing_3d_mm, library=library, size_range_mm=size,
                         subpleural=args.subpleural, exclude=None if healthy else item["label"][0].numpy() > 0,
                         seed=args.seed)
    out = Path(args.out) if args.out else default_run_dir(cfg, hist) / "inpainted"
    out.mkdir(parents=True, exist_ok=True)
    affine = np.diag([cfg.data.spacing_3d_mm] * 3 + [1.0])
    stem = f"{item['scan_id']}_{SUBTYPES[res.subtype]}_s{args.seed}"
    nib.save(nib.Nifti1Image(res.ct_hu.astype(np.float32), affine), str(out / f"{stem}_ct.nii.gz"))
    nib.save(nib.Nifti1Image(res.nodule_mask, affine), str(out / f"{stem}_label.nii.gz"))
    info = {"scan_id": item["scan_id"], "subtype": SUBTYPES[res.subtype], "centre": list(res.centre),
            "diameter_mm": res.diameter_mm, "delta_hu_outside": res.delta_hu_outside,
            "hist_jsd_to_target": js_divergence_np(res.target_histogram, res.generated_histogram),
            "checkpoint": str(model.run_dir)}
    write_json_atomic(out / f"{stem}.json", info)
    print(json.dumps(info))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from lungsynth.config import get_config, parse_overrides
    from lungsynth.methods.hr_ldm.evaluate import evaluate

    cfg = get_config(args.profile, parse_overrides(args.overrides))
    for row in evaluate(cfg)["rows"]:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
    return 0
