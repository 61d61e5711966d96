"""bbox-LDM cli room: ``lungsynth bbox-ldm`` parses the chapter's verbs."""


def test_cli_parses_the_chapter_verbs():
    from lungsynth.cli import build_parser

    args = build_parser().parse_args(["bbox-ldm", "sample", "--config", "2", "--sampler", "anatomical",
                                      "--profile", "smoke"])
    assert (args.verb, args.config, args.sampler) == ("sample", 2, "anatomical")
