"""``lungsynth <chapter> <verb>``: one command line for the whole course.

Each room of the library registers its own subcommand through a ``register(subparsers)``
function; this module only lists them, so ``lungsynth --help`` shows every chapter.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lungsynth.exports import module_present


# (module, what it adds). Order is the order of ``lungsynth --help``.
COMMAND_MODULES: tuple[str, ...] = (
    "lungsynth.course",
    "lungsynth.data.cli",
    "lungsynth.autoencoders.cli",
    "lungsynth.methods.land.cli",
    "lungsynth.methods.bbox_ldm.cli",
    "lungsynth.methods.hr_ldm.cli",
    "lungsynth.methods.lung_ddpm.cli",
    "lungsynth.methods.text2img.cli",
    "lungsynth.sampling.synth",
    "lungsynth.leaderboard",
    "lungsynth.downstream.cli",
    "lungsynth.quality",
    "lungsynth.bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lungsynth",
        description="Diffusion-based synthesis of chest CT with lung nodules: the course's command line.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True
    for name in COMMAND_MODULES:
        if name.startswith("lungsynth.methods.") and not module_present(name):
            continue  # a method removed from this checkout: the rest of the course still runs
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        # Bad input: one clear line, no traceback (set LUNGSYNTH_DEBUG=1 for it).
        import os
        if os.environ.get("LUNGSYNTH_DEBUG"):
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"lungsynth {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
