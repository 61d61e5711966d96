"""Chapter 06, Lung-DDPM's cli room: ``lungsynth lung-ddpm`` parses the chapter's flags."""

from __future__ import annotations

from lungsynth.methods.lung_ddpm import cli


def test_cli_parses_the_chapter_flags():
    from lungsynth.cli import build_parser

    args = build_parser().parse_args(["lung-ddpm", "sample", "--profile", "smoke", "--no-aas", "--no-lung-layout"])
    assert args.no_aas and args.no_lung_layout and args.verb == "sample"
    args = build_parser().parse_args(["lung-ddpm", "train", "--profile", "smoke"])
    assert not args.no_lung_layout and args.func is cli._cli
