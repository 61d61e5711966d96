"""Chapter 07, the cli room: ``lungsynth text2img sample`` refuses a bad prompt or guidance before loading anything."""

from __future__ import annotations

import pytest


def _sample(*extra: str):
    from lungsynth.cli import build_parser

    args = build_parser().parse_args(["text2img", "sample", "--profile", "smoke", "--run-dir", "/nonexistent", *extra])
    return args.func(args)


def test_sample_refuses_an_unknown_attribute_value():
    with pytest.raises(ValueError, match="unknown texture phrase 'glassy'.*expected one of 'ground-glass'"):
        _sample("--prompt", "The nodule is round in shape, glassy internally, with well-defined margins.")


def test_sample_refuses_a_guidance_scale_that_is_not_positive():
    with pytest.raises(SystemExit, match="--guidance 0: expected a scale > 0"):
        _sample("--guidance", "0", "--prompt", "The nodule is round in shape, solid internally, with well-defined margins.")
