"""Chapter 05 — HR-LDM, the cli room: ``lungsynth hr-ldm`` parses its verbs."""

from __future__ import annotations


def test_cli_parses_verbs():
    from lungsynth.cli import build_parser

    args = build_parser().parse_args(["hr-ldm", "train", "--profile", "smoke", "--no-hist-loss"])
    assert args.verb == "train" and args.no_hist_loss
    args = build_parser().parse_args(["hr-ldm", "inpaint", "--subtype", "ground-glass", "--size-mm", "10,20"])
    assert args.verb == "inpaint" and args.subtype == "ground-glass"
