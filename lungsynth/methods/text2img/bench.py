"""``lungsynth bench text2img``: one training step, and sampling a batch of ROIs with classifier-free
guidance versus without.

With guidance (s != 1) every sampling step evaluates the U-Net twice, on the prompt and on the empty
prompt (:func:`~lungsynth.methods.text2img.sample.guided_noise`), so it should cost about twice the
conditional-only sampling (s = 1); the bench measures that ratio. Each number runs in its own process
(peak RSS never goes down within one); on CUDA the peak is ``max_memory_allocated``. An untrained
U-Net of the profile's sizes on random ROIs, with the packaged MiniLM text encoder and an untrained
2D KL-VAE as the codec: speed and memory do not depend on the weights.
"""

from __future__ import annotations

import argparse
from typing import Any

from lungsynth.runtime import compare_precisions, run_child

CHILD = "lungsynth.methods.text2img.bench:_child"
GUIDED = 5.0  # the paper's best guidance scale; any s != 1 costs the same


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from lungsynth.autoencoders import build_autoencoder
    from lungsynth.config import get_config
    from lungsynth.data.prompts import write_prompt
    from lungsynth.engine import probe_steps
    from lungsynth.methods.text2img.model import LatentCodec, Text2ImgModel, TextEncoder, build_unet, train_scheduler
    from lungsynth.methods.text2img.sample import generate
    from lungsynth.methods.text2img.train import Text2ImgTask
    from lungsynth.runtime import device, measure

    cfg = get_config(spec["profile"], spec["overrides"])
    dev = device()
    torch.manual_seed(0)
    c, side = cfg.text2img, int(spec["size"])
    channels, lat = cfg.autoencoders.latent_channels, side // 4
    text, vae = TextEncoder.minilm(), build_autoencoder("vae2d", cfg)
    unet = build_unet(tuple(c.unet_channels), c.layers_per_block, text.dim, channels, lat, c.attention_head_dim)
    model = Text2ImgModel(unet, text, LatentCodec(vae, vae.scale_factor), train_scheduler(c.num_train_timesteps),
                          channels, lat, "bench").to(dev)
    B = int(c.batch_size)
    prompts = [write_prompt({"sphericity": 1 + i % 5, "texture": 1 + 2 * i % 5, "margin": 5 - i % 5,
                             "spiculation": 1 + 3 * i % 5, "calcification": 1 + i % 6}) for i in range(B)]
    if spec["what"] == "train":
        # a short run: optimiser steps on one batch, the loss of each
        task = Text2ImgTask(model, c.prompt_dropout)
        batch = {"image": torch.rand(B, 1, side, side, device=dev), "prompt": prompts}
        with measure() as m:
            r = probe_steps(task, batch, 1 + int(spec["repeats"]), lr=float(c.lr), device=dev)
        return {**r, "peak_mb": m["peak_mb"], "params": sum(p.numel() for p in unet.parameters())}

    def once() -> None:
        generate(model, prompts, float(spec["guidance"]), int(c.sample_steps), c.sampler, seed=0, device=dev)
    once()  # warm-up (and the prompts' encodings cached)
    with measure() as m:
        for _ in range(int(spec["repeats"])):
            once()
    return {"seconds": m["seconds"] / int(spec["repeats"]), "peak_mb": m["peak_mb"],
            "params": sum(p.numel() for p in unet.parameters())}


def bench_text2img(args: argparse.Namespace) -> int:
    """A training step, and sampling ``batch_size`` ROIs (``sample_steps``) at s = 1 and s = 5, with the ratio."""
    from lungsynth.config import get_config, parse_overrides

    overrides = parse_overrides(args.overrides)
    cfg = get_config(args.profile, overrides)
    c, side = cfg.text2img, int(args.size or cfg.data.roi_size)
    print(f"text2img bench ({cfg.profile}): {side}^2 ROIs (latent {side // 4}^2), U-Net {tuple(c.unet_channels)}, "
          f"batch {c.batch_size}, {c.sampler} {c.sample_steps} steps, repeats {args.repeats}; one process per number")
    runs = {"train step": ("train", None), "sample s = 1": ("sample", 1.0),
            f"sample s = {GUIDED:g}": ("sample", GUIDED)}
    res = {label: run_child(CHILD, {"profile": cfg.profile, "overrides": overrides, "size": side, "what": what,
                               "guidance": guidance, "repeats": args.repeats})
           for label, (what, guidance) in runs.items()}
    for label, r in res.items():
        print(f"  {label:>14}: {r['seconds']:8.3f} s  peak {r['peak_mb']:9.1f} MB  "
              f"U-Net {r['params'] / 1e6:.2f} M params")
    guided, plain = res[f"sample s = {GUIDED:g}"], res["sample s = 1"]
    print(f"guided / unguided sampling of {c.batch_size} ROIs: time {guided['seconds'] / plain['seconds']:.2f}x, "
          f"peak memory {guided['peak_mb'] / plain['peak_mb']:.2f}x")
    spec = {"profile": cfg.profile, "overrides": overrides, "size": side, "repeats": max(int(args.repeats), 5)}
    compare_precisions(CHILD, {"train step": {**spec, "what": "train", "guidance": None},
                               f"sample s = {GUIDED:g}": {**spec, "what": "sample", "guidance": GUIDED, "repeats": 1}})
    return 0
