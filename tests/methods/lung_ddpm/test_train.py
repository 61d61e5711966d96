"""Chapter 06, Lung-DDPM's train room: EMA through the engine, the full profile's settings, training runs."""

from __future__ import annotations

import copy

import pytest
import torch
from lung_ddpm_toys import tiny_cfg, toy_batch

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
    assert c.grad_clip == 0 and c.precision == "fp32" and c.train_patch == 0 and c.nodule_weight == 0
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


@pytest.mark.parametrize("prediction,loss", [("epsilon", "l1"), ("v_prediction", "l1"), ("v_prediction", "l2")])
def test_training_step_regresses_the_configured_target(toy_data, prediction, loss):
    """L1 (eq. 7) against epsilon, or against v = sqrt(ab) eps - sqrt(1 - ab) x0 with `lung_ddpm.prediction`;
    L2 with `lung_ddpm.loss`."""
    cfg = tiny_cfg(**{"lung_ddpm.prediction": prediction, "lung_ddpm.loss": loss, "lung_ddpm.nodule_weight": 0.0})
    task = ld.LungDdpmTask(cfg, "layout")
    assert task.scheduler.prediction_type == prediction
    seen = {}

    def zero_net(x, t):  # records x_t and t; a zero output makes the loss the target's mean |.|
        seen["x_t"], seen["t"] = x[:, :1].clone(), t.clone()
        return torch.zeros_like(x[:, :1])

    task.unet = zero_net
    ct, layout = toy_batch(toy_data)
    got = float(task.training_step({"ct": ct, "layout": layout}, 0)["loss"])
    x0 = ct * 2 - 1
    ab = task.scheduler.alphas_cumprod[seen["t"]].view(-1, 1, 1, 1, 1)
    eps = (seen["x_t"] - ab.sqrt() * x0) / (1 - ab).sqrt()
    v = ab.sqrt() * eps - (1 - ab).sqrt() * x0
    expected = {"epsilon": eps, "v_prediction": v}[prediction]
    other = {"epsilon": v, "v_prediction": eps}[prediction]
    measure = (lambda x: x.abs().mean()) if loss == "l1" else (lambda x: (x ** 2).mean())
    assert got == pytest.approx(float(measure(expected)), rel=1e-4)
    assert abs(got - float(measure(other))) > 1e-3
    assert ld.model_config(cfg, "layout")["prediction"] == prediction  # a checkpoint records it


@pytest.mark.parametrize("weight", [0.0, 20.0])
def test_nodule_weight_weighs_nodule_voxels_more(toy_data, weight):
    """`lung_ddpm.nodule_weight` w: the loss is the weighted mean with weight 1 + w on nodule voxels (label 2),
    1 elsewhere; w = 0 is eq. 7's plain mean. Checked by a zero network, whose loss is then the target's
    weighted mean square."""
    cfg = tiny_cfg(**{"lung_ddpm.prediction": "v_prediction", "lung_ddpm.loss": "l2",
                      "lung_ddpm.nodule_weight": weight})
    task = ld.LungDdpmTask(cfg, "layout")
    seen = {}

    def zero_net(x, t):
        seen["x_t"], seen["t"] = x[:, :1].clone(), t.clone()
        return torch.zeros_like(x[:, :1])

    task.unet = zero_net
    ct, layout = toy_batch(toy_data)
    assert (layout == 2).any()
    got = float(task.training_step({"ct": ct, "layout": layout}, 0)["loss"])
    x0 = ct * 2 - 1
    ab = task.scheduler.alphas_cumprod[seen["t"]].view(-1, 1, 1, 1, 1)
    eps = (seen["x_t"] - ab.sqrt() * x0) / (1 - ab).sqrt()
    sq = (ab.sqrt() * eps - (1 - ab).sqrt() * x0) ** 2
    w = 1 + weight * (layout == 2).float()
    expected = ((sq * w).sum((1, 2, 3, 4)) / w.sum((1, 2, 3, 4))).mean()
    assert got == pytest.approx(float(expected), rel=1e-4)
    plain = float(sq.mean((1, 2, 3, 4)).mean())
    assert (got == pytest.approx(plain, rel=1e-4)) == (weight == 0)
    assert ld.model_config(cfg, "layout")["nodule_weight"] == weight  # a checkpoint records it
    with pytest.raises(ValueError, match="nodule_weight"):
        ld.nodule_weights(layout, -1.0)


def test_auto_precision_is_bf16_on_avx512_bf16_cpus_for_lung_ddpm_only(monkeypatch):
    """Lung-DDPM's auto picks bf16 on an AVX512-BF16 CPU without AMX (measured safe for its U-Net), where the
    engine's auto keeps fp32; an explicit key, the env var and `full`'s fp32 win; the trainer gets the choice."""
    from lungsynth import runtime

    monkeypatch.delenv("LUNGSYNTH_PRECISION", raising=False)
    monkeypatch.setattr(runtime, "cpu_flags", lambda *a: {"avx512f", "avx512_bf16"})
    monkeypatch.setattr(runtime, "device", lambda: torch.device("cpu"))
    cfg = tiny_cfg()
    assert cfg.lung_ddpm.precision == "auto" and runtime.choose_precision(torch.device("cpu")).name == "fp32"
    assert ld.precision(cfg) == "bf16"
    assert ld.make_trainer(cfg, None, progress=False).precision == "bf16"
    assert ld.precision(tiny_cfg(**{"lung_ddpm.precision": "fp32"})) == "fp32"
    assert ld.precision(get_config("full")) == "fp32"
    monkeypatch.setattr(runtime, "cpu_flags", lambda *a: {"avx2"})
    assert ld.precision(cfg) == "fp32"
    monkeypatch.setattr(runtime, "cpu_flags", lambda *a: {"avx512_bf16"})
    monkeypatch.setenv("LUNGSYNTH_PRECISION", "fp32")
    assert ld.precision(cfg) == "fp32"


def test_a_run_trained_with_another_config_is_trained_again(toy_data, tmp_path):
    """A run whose checkpoint holds other widths, target or loss (a profile changed since) is trained again
    from scratch with a warning, not loaded into an error or silently reused."""
    from lungsynth.engine import load_checkpoint

    cfg = tiny_cfg(**{"lung_ddpm.loss": "l1"})
    run = ld.train(cfg, "layout", tmp_path / "run", dataset=toy_data, progress=False)
    assert ld.config_mismatch(run, cfg) is None
    assert ld.ensure_trained(cfg, "layout", run, dataset=toy_data) == run  # fits: reused
    changed = tiny_cfg(**{"lung_ddpm.loss": "l2"})
    assert "loss" in ld.config_mismatch(run, changed)
    with pytest.warns(UserWarning, match="training it again from scratch"):
        ld.ensure_trained(changed, "layout", run, dataset=toy_data)
    ckpt = load_checkpoint(run / "final.pt")
    assert ckpt["config"]["loss"] == "l2" and ld.config_mismatch(run, changed) is None
    ld.load(changed, "layout", run, train_if_missing=False)  # loads without the mismatch error


def test_one_config_trains_to_the_same_weights(toy_data, tmp_path):
    """The initial weights come from cfg.seed too: two trainings of one config, in one process with the global
    RNG drawn in between, end bit-identical (they differed from the first step when the U-Net was built
    before the engine seeded)."""
    cfg = tiny_cfg(**{"lung_ddpm.train_steps": 2})
    first = ld.train(cfg, "layout", tmp_path / "a", dataset=toy_data, progress=False)
    torch.rand(1000)  # whatever ran before must not matter
    second = ld.train(cfg, "layout", tmp_path / "b", dataset=toy_data, progress=False)
    a, b = (torch.load(r / "final.pt", map_location="cpu", weights_only=True)["modules"]["unet"] for r in (first, second))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_chapter_06_try_this_layout_encoding_trains_a_model_with_its_one_channel_layout(toy_data, tmp_path,
                                                                                          monkeypatch):
    """Chapter 06's "Try this" (``lung_ddpm.layout_encoding = "scaled"``) on a one-step budget: a run of its own
    whose U-Net reads one layout channel (not the three of one-hot), recorded in its settings, beside the one-hot
    run, which is left as it was."""
    from lungsynth import run_settings

    monkeypatch.setenv("LUNGSYNTH_HOME", str(tmp_path))
    onehot = ld.ensure_trained(tiny_cfg(**{"lung_ddpm.train_steps": 1}), "layout", dataset=toy_data)
    before = (onehot / "final.pt").stat().st_mtime_ns
    scaled = ld.ensure_trained(tiny_cfg(**{"lung_ddpm.train_steps": 1, "lung_ddpm.layout_encoding": "scaled"}),
                               "layout", dataset=toy_data)
    assert scaled != onehot and scaled.parent == onehot.parent
    assert run_settings.recorded(scaled)["lung_ddpm.layout_encoding"] == "scaled"

    def input_channels(run):
        weights = torch.load(run / "final.pt", map_location="cpu", weights_only=True)["modules"]["unet"]
        return next(w.shape[1] for w in weights.values() if w.ndim == 5)  # the first 3D convolution's input

    assert (input_channels(onehot), input_channels(scaled)) == (1 + 3, 1 + 1)  # x_t + the layout's channels
    assert (onehot / "final.pt").stat().st_mtime_ns == before
