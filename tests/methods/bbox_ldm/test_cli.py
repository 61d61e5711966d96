"""bbox-LDM cli room: ``lungsynth bbox-ldm`` parses the chapter's verbs."""


def test_cli_parses_the_chapter_verbs():
    from lungsynth.cli import build_parser

    args = build_parser().parse_args(["bbox-ldm", "sample", "--config", "2", "--sampler", "anatomical",
                                      "--profile", "smoke"])
    assert (args.verb, args.config, args.sampler) == ("sample", 2, "anatomical")


def test_the_bench_measures_a_train_step_and_a_sample_of_both_mask_contexts():
    """`lungsynth bench bbox-ldm` times each number in a child; the child itself runs here (it once failed on the
    missing lung channel of its batch)."""
    from lungsynth.methods.bbox_ldm.bench import _child

    tiny = {"bbox_ldm.unet_channels": "16,16,32", "bbox_ldm.batch_size": 2, "bbox_ldm.ddim_steps": 2}
    for context in ("flat", "pooled"):
        for what in ("train", "sample"):
            r = _child({"profile": "smoke", "overrides": {**tiny, "bbox_ldm.mask_context": context}, "size": 32,
                        "config": 2, "what": what, "repeats": 1})
            assert r["seconds"] > 0 and r["params"] > 0
