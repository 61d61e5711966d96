"""``lungsynth bench <name>``: speed and memory measured in one run, printed as ratios.

Benchmarks never run in the tests. Each room provides a function ``bench_<name>(args)``;
this module maps names to them lazily so importing the CLI stays cheap.
"""

from __future__ import annotations

import argparse
import importlib

# name -> "module:function"
BENCHMARKS: dict[str, str] = {
    "data": "lungsynth.data.bench:bench_data",
    "vae": "lungsynth.autoencoders.bench:bench_vae",
    "land": "lungsynth.methods.land.bench:bench_land",
    "lung-ddpm": "lungsynth.methods.lung_ddpm.bench:bench_lung_ddpm",
    "hr-ldm": "lungsynth.methods.hr_ldm.bench:bench_hr_ldm",
    "bbox-ldm": "lungsynth.methods.bbox_ldm.bench:bench_bbox_ldm",
    "text2img": "lungsynth.methods.text2img.bench:bench_text2img",
}


def register(sub: argparse._SubParsersAction) -> None:
    from lungsynth.config import add_profile_argument

    p = sub.add_parser("bench", help="benchmarks: speed and memory, as ratios measured in one run")
    p.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    p.add_argument("--size", type=int, default=None, help="volume side for benchmarks that take one")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-paper-sampler", dest="paper_sampler", action="store_false",
                   help="lung-ddpm: skip timing the paper's 250-step DDPM beside the configured sampler")
    add_profile_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    module, func = BENCHMARKS[args.name].split(":")
    return int(getattr(importlib.import_module(module), func)(args) or 0)
