"""Chapter 06, Lung-DDPM's train room: EMA through the engine, the full profile's settings, training runs."""

from __future__ import annotations

import copy

import pytest
import torch
from lung_ddpm_toys import tiny_cfg

from lungsynth.config import get_config
from lungsynth.methods import lung_ddpm as ld


def test_ema_update_through_the_engine_matches_hand_computation(toy_data):
    """EMA after step s (s % every == 0): copy while s < start, else ema <- d ema + (1 - d) w_s."""
    cfg = tiny_cfg(**{"lung_ddpm.train_steps": 4, "lung_ddpm.ema_start": 3, "lung_ddpm.ema_every": 2,
                       "lung_ddpm.unet_channels": "8,8", "lung_ddpm.attention_at": "1"})
    seen: dict[int, list[torch.Tensor]] = {}
    base = ld.LungDdpmTask

    class Recording(base):
        def training_step(self, batch, step):
            seen[step] = [p.detach().clone().double() for p in self.unet.parameters()]
            return super().training_step(batch, step)

    task = Recording(cfg, "layout")
    trainer = ld.make_trainer(cfg, None, progress=False)
    assert (trainer.ema_decay, trainer.ema_start, trainer.ema_every) == (0.995, 3, 2)
    assert trainer.lr == cfg.lung_ddpm.lr and trainer.max_steps == 4
    trainer.fit(task, toy_data)
    weights = [seen[i] for i in range(4)] + [[p.detach().clone().double() for p in task.unet.parameters()]]
    d = cfg.lung_ddpm.ema_decay
    ema = [w.clone() for w in weights[0]]
    for s in range(1, 5):  # step 2: a copy (2 < start), step 4: an average, odd steps: skipped
        if s % 2:
            continue
        ema = [w.clone() for w in weights[s]] if s < 3 else [d * e + (1 - d) * w for e, w in zip(ema, weights[s])]
    got = [p.double() for p in trainer.ema.module("unet").parameters()]
    assert any(not torch.equal(e, w) for e, w in zip(ema, weights[4]))  # EMA differs from the raw weights
    for e, g in zip(ema, got):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)


def test_full_profile_settings():
    """`full` trains as the reference code: fp32, unclipped, batch 1 with 2 accumulated, lr 1e-5, 100k steps,
    EMA 0.995 from step 2000 every 10, whole 128^3 volumes; the trainer it builds says so."""
    full = get_config("full")
    c = full.lung_ddpm
    assert c.unet_channels[0] == 64 and c.num_train_timesteps == 250 and c.schedule == "cosine" and c.lr == 1e-5
    assert (c.batch_size, c.grad_accum, c.train_steps) == (1, 2, 100_000)
    assert (c.ema_decay, c.ema_start, c.ema_every) == (0.995, 2000, 10)
    assert c.grad_clip == 0 and c.precision == "fp32" and c.train_patch == 0
    assert full.data.size_ddpm == 128
    trainer = ld.make_trainer(full, None, progress=False)
    assert (trainer.batch_size, trainer.grad_accum, trainer.grad_clip, trainer.precision) == (1, 2, None, "fp32")
    assert (trainer.ema_decay, trainer.ema_start, trainer.ema_every, trainer.lr) == (0.995, 2000, 10, 1e-5)


def test_train_writes_run_and_load_uses_ema(trained):
    from lungsynth.engine import load_checkpoint

    cfg, runs = trained
    for variant, run in runs.items():
        assert (run / "final.pt").is_file() and (run / "metrics.csv").is_file() and (run / "run.json").is_file()
        before = (run / "final.pt").stat().st_mtime_ns
        assert ld.ensure_trained(cfg, variant, run, dataset=[]) == run  # already trained: no retraining
        assert (run / "final.pt").stat().st_mtime_ns == before
    ckpt = load_checkpoint(runs["layout"] / "final.pt")
    # the paper samples with the EMA weights (`full`); smoke and course with the raw ones, whose budgets are
    # shorter than the EMA's ~2000-step window
    for sample_ema, stored in ((True, ckpt["ema"]["unet"]), (False, ckpt["modules"]["unet"])):
        c = copy.deepcopy(cfg)
        c.lung_ddpm.sample_ema = sample_ema
        model = ld.load(c, "layout", runs["layout"], train_if_missing=False)
        for name, p in model.unet.state_dict().items():
            assert torch.equal(p, stored[name]), (sample_ema, name)
    assert any(not torch.equal(ckpt["ema"]["unet"][k], v) for k, v in ckpt["modules"]["unet"].items())
    assert get_config("full").lung_ddpm.sample_ema and not get_config("course").lung_ddpm.sample_ema
    with pytest.raises(ValueError, match="another"):
        ld.load(cfg, "no_lung_layout", runs["layout"], train_if_missing=False)
