"""The training engine on tiny CPU models: convergence, checkpoints, exact resume, EMA, gradient
accumulation, LR schedules, two optimisers, refusal of foreign checkpoints, 2-process DDP, and a clean
stop on SIGINT/SIGTERM that resumes to the losses of an uninterrupted run."""

from __future__ import annotations

import csv
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lungsynth.config import get_config
from lungsynth.engine import (EMA, InfiniteSampler, SimpleTask, Trainer, TrainTask, load_checkpoint,
                              load_weights, lr_factor, plot_metrics, read_metrics)

REPO = Path(__file__).resolve().parents[1]


def regression_data(n: int = 64, seed: int = 0) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    w = torch.randn(4, 1, generator=g)
    return torch.utils.data.TensorDataset(x, x @ w + 0.01 * torch.randn(n, 1, generator=g))


def mlp(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 1))


def mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def losses_of(run_dir: Path, key: str = "loss") -> dict[int, float]:
    with open(run_dir / "metrics.csv", newline="") as fh:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(fh) if r.get(key)}


def flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.state_dict().values()])


def test_loss_decreases_on_toy_regression(tmp_path):
    task = SimpleTask(mlp(), mse, kind="toy", config={"width": 16})
    engine = get_config("smoke").engine  # log every 5 steps, clip at 1.0
    trainer = Trainer.from_config(engine, tmp_path, max_steps=60, lr=1e-2, batch_size=8, progress=False)
    assert trainer.grad_clip == engine.grad_clip and trainer.checkpoint_every == engine.checkpoint_every
    result = trainer.fit(task, regression_data())
    losses = losses_of(tmp_path)
    assert result.steps == 60 and result.stopped_by == "max_steps"
    assert losses[60] < 0.2 * losses[5]
    assert (tmp_path / "last.pt").is_file() and (tmp_path / "final.pt").is_file()
    assert (tmp_path / "engine.json").is_file()


def test_checkpoint_loads_weights_only(tmp_path):
    task = SimpleTask(mlp(), mse, kind="toy", config={"width": 16, "channels": (1, 2)})
    Trainer(tmp_path, max_steps=4, batch_size=4, ema_decay=0.9, progress=False).fit(task, regression_data())
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["kind"] == "toy" and ckpt["step"] == 4 and ckpt["data_position"] == 16
    assert ckpt["config"] == {"width": 16, "channels": [1, 2]}
    assert set(ckpt) >= {"modules", "optimizers", "schedulers", "ema", "rng", "trainer", "elapsed_s"}
    rng = ckpt["rng"][0]
    assert isinstance(rng["torch"], torch.Tensor) and rng["numpy"]["key"].numel() == 624
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    assert "optimizers" not in final and torch.equal(final["modules"]["model"]["0.weight"],
                                                    task.model.state_dict()["0.weight"])
    # downstream loading prefers the EMA weights when the checkpoint has them
    fresh = mlp(seed=5)
    load_weights(tmp_path, kind="toy", config={"width": 16, "channels": (1, 2)}, modules={"model": fresh})
    ema = final["ema"]["model"]
    assert all(torch.equal(fresh.state_dict()[k], ema[k]) for k in ema)
    raw = load_weights(tmp_path, use_ema=False)["model"]
    assert not torch.equal(raw["0.weight"], ema["0.weight"])


class NoisyTask(SimpleTask):
    """A loss that draws from every RNG the engine checkpoints (torch via dropout and randn,
    NumPy, Python), and can 'die' at a given step."""

    def __init__(self, die_at: int | None = None) -> None:
        super().__init__(mlp(dropout=0.2), mse, kind="toy", config={"width": 16})
        self.die_at = die_at

    def training_step(self, batch, step):
        if step == self.die_at:
            raise KeyboardInterrupt("simulated kill")
        x, y = batch
        noise = 0.01 * torch.randn_like(x) + float(np.random.rand()) * 1e-3 + random.random() * 1e-3
        return {"loss": F.mse_loss(self.model(x + noise), y), "noise": noise.mean()}


def resumable_trainer(run_dir: Path) -> Trainer:
    return Trainer(run_dir, max_steps=12, lr=5e-3, batch_size=5, grad_accum=2, schedule="cosine", warmup_steps=3,
                   grad_clip=1.0, ema_decay=0.8, ema_start=2, ema_every=2, checkpoint_every=4, log_every=1,
                   seed=3, progress=False)


def test_resume_is_exact(tmp_path):
    data = regression_data(n=23)  # odd size: epochs end mid-batch
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    straight = NoisyTask()
    resumable_trainer(straight_dir).fit(straight, data)

    with pytest.raises(KeyboardInterrupt):
        resumable_trainer(killed_dir).fit(NoisyTask(die_at=9), data)
    assert load_checkpoint(killed_dir / "last.pt")["step"] == 8
    assert max(losses_of(killed_dir)) == 9  # logged past the checkpoint, rewritten on resume

    resumed = NoisyTask()
    trainer = resumable_trainer(killed_dir)
    result = trainer.fit(resumed, data)
    assert result.start_step == 8 and result.steps == 12
    a, b = losses_of(straight_dir), losses_of(killed_dir)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert abs(a[step] - b[step]) < 1e-6, step
    assert losses_of(straight_dir, "noise") == pytest.approx(losses_of(killed_dir, "noise"), abs=1e-7)
    assert torch.allclose(flat(straight.model), flat(resumed.model), atol=1e-6, rtol=0)
    ema_a = load_weights(straight_dir / "final.pt", use_ema=True)["model"]
    ema_b = load_weights(killed_dir / "final.pt", use_ema=True)["model"]
    assert all(torch.allclose(ema_a[k], ema_b[k], atol=1e-6, rtol=0) for k in ema_a)


class RecordingTask(SimpleTask):
    """Records the model's weights at the start of every step (= after the previous one)."""

    def __init__(self) -> None:
        super().__init__(mlp(), mse, kind="toy")
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, step):
        self.seen.append(flat(self.model).clone())
        return super().training_step(batch, step)


def test_ema_matches_hand_computation():
    decay, start, every, steps = 0.7, 4, 3, 11
    task = RecordingTask()
    trainer = Trainer(None, max_steps=steps, lr=1e-2, batch_size=4, ema_decay=decay, ema_start=start,
                      ema_every=every, progress=False)
    trainer.fit(task, regression_data())
    after = task.seen[1:] + [flat(task.model)]  # weights after step s = 1..steps
    ema = task.seen[0].clone()
    for s, w in enumerate(after, start=1):
        if s % every == 0:
            ema = w.clone() if s < start else decay * ema + (1 - decay) * w
    assert torch.allclose(flat(trainer.ema.module("model")), ema, atol=1e-6)
    # steps 3 (copy), 6 and 9 (averaged): the average is neither the copy nor the live weights
    assert not torch.allclose(ema, after[-1]) and not torch.allclose(ema, after[2])


def test_ema_class_rule():
    lin = nn.Linear(1, 1, bias=False)
    ema = EMA({"m": lin}, decay=0.5, start=2, every=1)
    with torch.no_grad():
        lin.weight.fill_(4.0)
    ema.update({"m": lin}, 1)  # before start: copy
    assert ema.module("m").weight.item() == 4.0
    with torch.no_grad():
        lin.weight.fill_(0.0)
    ema.update({"m": lin}, 2)
    assert ema.module("m").weight.item() == pytest.approx(2.0)


class SgdTask(SimpleTask):
    """Plain SGD with momentum: unlike Adam, it is not blind to a wrongly scaled gradient."""

    def configure_optimizers(self, lr, weight_decay):
        return {"model": torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.9)}


def test_grad_accumulation_equals_bigger_batch():
    data = regression_data()
    small, big = SgdTask(mlp(), mse), SgdTask(mlp(), mse)
    Trainer(None, max_steps=6, lr=0.05, batch_size=4, grad_accum=2, progress=False).fit(small, data)
    Trainer(None, max_steps=6, lr=0.05, batch_size=8, grad_accum=1, progress=False).fit(big, data)
    assert torch.allclose(flat(small.model), flat(big.model), atol=1e-6, rtol=0)
    assert not torch.allclose(flat(small.model), flat(mlp()), atol=1e-3)


def test_polynomial_lr_values(tmp_path):
    total, power = 10, 2.0
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=total, power=power)
    for step in range(total + 2):
        assert lr_factor(step, "polynomial", total, power=power) == pytest.approx(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert lr_factor(3, "polynomial", 10, warmup_steps=2, power=2.0) == pytest.approx((1 - 1 / 8) ** 2)
    assert lr_factor(0, "polynomial", 10, warmup_steps=2) == pytest.approx(0.5)
    assert lr_factor(9, "polynomial", 10, power=1.0, min_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.1)
    assert lr_factor(5, "cosine", 10) == pytest.approx(0.5)
    # the trainer uses these values, step by step
    Trainer(tmp_path, max_steps=8, lr=0.1, batch_size=4, schedule="polynomial", poly_power=2.0, warmup_steps=2,
            log_every=1, progress=False).fit(SimpleTask(mlp(), mse), regression_data())
    lrs = losses_of(tmp_path, "lr")
    for step, lr in lrs.items():
        assert lr == pytest.approx(0.1 * lr_factor(step - 1, "polynomial", 8, 2, 2.0), rel=1e-6)
    with pytest.raises(ValueError, match="unknown LR schedule"):
        Trainer(None, schedule="linear")


class GanTask(TrainTask):
    """A generator and a patch-discriminator-like critic, each with its own optimiser."""

    kind = "toy_gan"

    def __init__(self, warmup: int = 2) -> None:
        torch.manual_seed(0)
        self.gen = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4))
        self.disc = nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))
        self.warmup = warmup
        self.disc_at_warmup_end: torch.Tensor | None = None

    def modules(self):
        return {"generator": self.gen, "discriminator": self.disc}

    def configure_optimizers(self, lr, weight_decay):
        return {"generator": torch.optim.AdamW(self.gen.parameters(), lr=lr),
                "discriminator": torch.optim.AdamW(self.disc.parameters(), lr=lr * 2)}

    def training_step(self, batch, step):
        x, _ = batch
        recon = self.gen(x)
        adversarial = F.softplus(-self.disc(recon)).mean()  # runs through the discriminator
        loss_g = F.l1_loss(recon, x) + 0.1 * adversarial
        if step < self.warmup:
            self.disc_at_warmup_end = flat(self.disc).clone()
            return {"loss_generator": loss_g, "loss_discriminator": None}
        loss_d = F.softplus(self.disc(recon.detach())).mean() + F.softplus(-self.disc(x)).mean()
        # what the discriminator's gradient must be: its own loss only, not the generator's
        self.expected_disc_grad = torch.autograd.grad(loss_d, list(self.disc.parameters()), retain_graph=True)
        return {"loss_generator": loss_g, "loss_discriminator": loss_d, "adv": adversarial}


def test_two_optimiser_gan_task_steps_both(tmp_path):
    task = GanTask(warmup=2)
    gen0, disc0 = flat(task.gen).clone(), flat(task.disc).clone()
    trainer = Trainer(tmp_path, max_steps=2, lr=1e-2, batch_size=8, log_every=1, grad_clip=1.0, progress=False)
    trainer.fit(task, regression_data())
    # warm-up: the generator learns, the discriminator (skipped, and untouched by the
    # generator's adversarial gradient) does not move
    assert not torch.allclose(flat(task.gen), gen0)
    assert torch.equal(flat(task.disc), disc0)
    result = Trainer(tmp_path, max_steps=6, lr=1e-2, batch_size=8, log_every=1, progress=False).fit(
        task, regression_data())
    assert result.start_step == 2 and not torch.allclose(flat(task.disc), disc0)
    for p, expected in zip(task.disc.parameters(), task.expected_disc_grad):
        assert torch.allclose(p.grad, expected, atol=1e-7)
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert set(ckpt["optimizers"]) == {"generator", "discriminator"}
    assert ckpt["optimizers"]["discriminator"]["state"][0]["step"].item() == 4
    assert ckpt["optimizers"]["generator"]["state"][0]["step"].item() == 6
    m = read_metrics(tmp_path)
    assert {"loss_generator", "loss_discriminator", "lr_generator", "lr_discriminator", "adv"} <= set(m)
    assert np.isnan(m["loss_discriminator"][0]) and np.isfinite(m["loss_discriminator"][-1])
    assert m["lr_discriminator"][-1] == pytest.approx(2 * m["lr_generator"][-1])


def test_foreign_checkpoint_is_refused(tmp_path):
    Trainer(tmp_path, max_steps=2, batch_size=4, progress=False).fit(
        SimpleTask(mlp(), mse, kind="vae3d", config={"channels": [16, 32]}), regression_data())
    with pytest.raises(ValueError, match=r"kind 'vae3d', but kind 'vqvae2d'"):
        load_weights(tmp_path, kind="vqvae2d")
    with pytest.raises(ValueError, match=r"channels: checkpoint \[16, 32\] vs asked \[32, 64\]"):
        load_weights(tmp_path / "last.pt", kind="vae3d", config={"channels": (32, 64)})
    assert "model" in load_weights(tmp_path, kind="vae3d", config={"channels": (16, 32)})
    # resuming a run directory with another config is refused too; fresh=True starts over
    other = SimpleTask(mlp(), mse, kind="vae3d", config={"channels": [8]})
    with pytest.raises(ValueError, match="another 'vae3d' config"):
        Trainer(tmp_path, max_steps=4, batch_size=4, progress=False).fit(other, regression_data())
    result = Trainer(tmp_path, max_steps=3, batch_size=4, progress=False, fresh=True).fit(other, regression_data())
    assert result.start_step == 0 and load_checkpoint(tmp_path)["config"] == {"channels": [8]}
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_weights(tmp_path / "missing")


def test_validation_time_budget_and_plot(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    task = SimpleTask(mlp(), mse, kind="toy", val_fn=lambda m, b: {"mse": F.mse_loss(m(b[0]), b[1])})
    data = regression_data()
    result = Trainer(tmp_path, max_steps=10, batch_size=8, val_every=5, log_every=2, lr=1e-2,
                     progress=False).fit(task, data, val_data=regression_data(n=10, seed=1))
    m = read_metrics(tmp_path)
    assert np.isfinite(m["val_mse"]).sum() == 2 and "val_mse" in result.last_losses
    ax = plot_metrics(tmp_path)
    assert {line.get_label() for line in ax.get_lines()} == {"loss", "val_mse"}
    again = Trainer(tmp_path, max_steps=10, batch_size=8, progress=False).fit(task, data)
    assert again.stopped_by == "already_done" and again.steps == 10
    budget = Trainer(tmp_path / "b", max_steps=1000, batch_size=8, time_budget_s=0.0, progress=False).fit(task, data)
    assert budget.stopped_by == "time_budget" and budget.steps == 1
    assert load_checkpoint(tmp_path / "b")["step"] == 1


def test_infinite_sampler_shards_match_one_process():
    one = InfiniteSampler(7, seed=1)
    it = iter(one)
    stream = [next(it) for _ in range(30)]
    assert sorted(stream[:7]) == list(range(7)) and sorted(stream[7:14]) == list(range(7))
    shards = [iter(InfiniteSampler(7, seed=1, rank=r, world_size=2)) for r in range(2)]
    interleaved = [next(shards[i % 2]) for i in range(30)]
    assert interleaved == stream
    late = iter(InfiniteSampler(7, seed=1, rank=1, world_size=2, start=5))
    assert [next(late) for _ in range(4)] == stream[11:19:2]


DDP_SCRIPT = """
import sys, torch, torch.nn.functional as F
import torch.distributed as dist
from torch import nn
from lungsynth.config import get_config
from lungsynth.engine import SimpleTask, Trainer

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
g = torch.Generator().manual_seed(0)
x = torch.randn(64, 4, generator=g); y = x @ torch.randn(4, 1, generator=g)
data = torch.utils.data.TensorDataset(x, y)
task = SimpleTask(model, lambda m, b: F.mse_loss(m(b[0]), b[1]), kind="toy")
result = Trainer(sys.argv[1], max_steps=6, lr=1e-2, batch_size=4, checkpoint_every=3, log_every=2,
                 ema_decay=0.9, progress=False).fit(task, data)
weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
torch.save(weights, f"{sys.argv[1]}/rank{dist.get_rank()}_of_{dist.get_world_size()}.pt")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_on_cpu(tmp_path):
    script = tmp_path / "train_ddp.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "LUNGSYNTH_DEVICE": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), str(script), str(run_dir)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = load_checkpoint(run_dir / "last.pt")
    assert ckpt["step"] == 6 and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert ckpt["data_position"] == 6 * 4 * 2
    w0 = torch.load(run_dir / "rank0_of_2.pt", weights_only=True)
    w1 = torch.load(run_dir / "rank1_of_2.pt", weights_only=True)
    assert torch.equal(w0, w1)  # the ranks stay in sync
    # two processes with batch 4 = one process with batch 8 (same samples, averaged gradients)
    torch.manual_seed(0)
    single = SimpleTask(nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)), mse, kind="toy")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    data = torch.utils.data.TensorDataset(x, x @ torch.randn(4, 1, generator=g))
    Trainer(None, max_steps=6, lr=1e-2, batch_size=8, progress=False).fit(single, data)
    assert torch.allclose(w0, torch.cat([p.detach().reshape(-1) for p in single.model.parameters()]), atol=1e-5)
    rows = read_metrics(run_dir)
    assert list(rows["step"]) == [2, 4, 6]


SIGINT_SCRIPT = """
import sys, time
import torch
import torch.nn.functional as F
from torch import nn
from lungsynth.engine import SimpleTask, Trainer

run_dir, slow = sys.argv[1], sys.argv[2] == "slow"
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
g = torch.Generator().manual_seed(0)
x = torch.randn(40, 4, generator=g)
data = torch.utils.data.TensorDataset(x, x @ torch.randn(4, 1, generator=g))


def loss(m, batch):
    if slow:
        time.sleep(0.05)  # leaves time for the signal to land mid-run
    print("step", flush=True)
    return F.mse_loss(m(batch[0]), batch[1])


Trainer(run_dir, max_steps=60, lr=1e-2, batch_size=4, log_every=1, progress=False,
        checkpoint_every=None).fit(SimpleTask(model, loss, kind="toy"), data)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_and_the_resumed_run_matches(tmp_path, sig):
    script = tmp_path / "train.py"
    script.write_text(SIGINT_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run, straight = tmp_path / "run", tmp_path / "straight"
    proc = subprocess.Popen([sys.executable, str(script), str(run), "slow"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    for _ in range(5):  # five steps done, then the signal
        assert proc.stdout.readline().strip() == "step"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    stopped = load_checkpoint(run / "last.pt")["step"]
    assert 5 <= stopped < 60 and not (run / "final.pt").exists()
    assert f"toy: stopped at step {stopped}; run the same command to resume" in err
    assert "Traceback" not in err
    for d, mode in ((run, "slow"), (straight, "fast")):  # resume; and a run never interrupted
        done = subprocess.run([sys.executable, str(script), str(d), mode], capture_output=True, text=True, env=env,
                              timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
    a, b = losses_of(straight), losses_of(run)
    assert sorted(a) == sorted(b) == list(range(1, 61))
    assert all(abs(a[s] - b[s]) < 1e-7 for s in a)


def test_a_step_with_non_finite_gradients_is_skipped_not_applied(tmp_path):
    """A NaN gradient under a finite loss (what bf16 convolutions gave on one CPU) must not reach the weights."""
    task = SimpleTask(mlp(), mse, kind="toy")
    trainer = Trainer(tmp_path, max_steps=8, lr=1e-2, batch_size=8, grad_clip=1.0, progress=False)
    weights = {}

    def before_forward(module, args):  # the engine's step counter, read before each forward
        weights[trainer.step] = flat(task.model).clone()

    task.model.register_forward_pre_hook(before_forward)
    task.model[0].weight.register_hook(lambda g: g * float("nan") if trainer.step == 3 else g)
    with pytest.warns(RuntimeWarning, match="non-finite gradients"):
        result = trainer.fit(task, regression_data())
    assert result.skipped_steps == 1 and result.steps == 8
    assert torch.equal(weights[3], weights[4])  # step 3 left every weight alone
    assert not torch.equal(weights[4], weights[5])  # and training went on
    assert torch.isfinite(flat(task.model)).all()


def test_probe_steps_times_and_records_a_short_run():
    from lungsynth.engine import probe_steps

    x, y = regression_data().tensors
    out = probe_steps(SimpleTask(mlp(), mse, kind="toy"), (x[:16], y[:16]), 12, lr=1e-2)
    assert len(out["losses"]) == 12 and out["skipped_steps"] == 0 and out["seconds"] > 0
    assert out["losses"][-1] < 0.5 * out["losses"][0]  # the optimiser steps: it is a run, not one step repeated
    with pytest.raises(ValueError, match=">= 2 steps"):
        probe_steps(SimpleTask(mlp(), mse, kind="toy"), (x, y), 1)


def scripted_validation(script, snapshots):
    """A toy task class whose validation gives ``script[step]`` and records the weights in ``snapshots``."""
    class Scripted(SimpleTask):
        def validation_step(self, batch, step):
            snapshots[step] = flat(self.model).clone()
            return {"score": script[step]}

    return Scripted


def test_keep_best_holds_the_weights_of_the_lowest_validation(tmp_path):
    """A scripted validation number (low at step 4, higher after): best.pt keeps step 4's weights and value; a
    resumed run keeps comparing with what best.pt holds; a fresh start removes it."""
    from lungsynth.engine import BEST_NAME

    script = {2: 3.0, 4: 1.0, 6: 2.0, 8: 1.5, 10: 0.5}
    snapshots = {}
    Scripted = scripted_validation(script, snapshots)

    task = Scripted(mlp(), mse, kind="toy")
    Trainer(tmp_path, max_steps=8, batch_size=8, val_every=2, keep_best="val_score", checkpoint_every=2, lr=1e-2,
            progress=False).fit(task, regression_data())
    best = load_checkpoint(tmp_path / BEST_NAME)
    assert best["best"] == {"metric": "val_score", "value": 1.0, "step": 4} and best["step"] == 4
    model = mlp()
    model.load_state_dict(best["modules"]["model"])
    assert torch.equal(flat(model), snapshots[4])
    Trainer(tmp_path, max_steps=10, batch_size=8, val_every=2, keep_best="val_score", lr=1e-2,
            progress=False).fit(task, regression_data())  # resumes at 8; step 10 beats 1.0
    assert load_checkpoint(tmp_path / BEST_NAME)["best"]["step"] == 10
    Trainer(tmp_path, max_steps=1, batch_size=8, keep_best="val_score", lr=1e-2, progress=False,
            fresh=True).fit(task, regression_data())
    assert not (tmp_path / BEST_NAME).exists()
    with pytest.raises(ValueError, match="keep_best='val_kid', but validation gave only"):
        Trainer(tmp_path / "c", max_steps=2, batch_size=8, val_every=2, keep_best="val_kid",
                progress=False).fit(task, regression_data())


def test_early_stopping_in_memory_restores_the_best_validation_step():
    """Without a run directory the best weights stay in memory and ``restore_best`` loads them; ``patience`` ends
    the fit after that many validations without a better value (the downstream fits' early stopping)."""
    script = {2: 3.0, 4: 1.0, 6: 2.0, 8: 1.5, 10: 0.5, 12: 0.1}
    snapshots = {}
    Scripted = scripted_validation(script, snapshots)

    task = Scripted(mlp(), mse, kind="toy")
    trainer = Trainer(None, max_steps=12, batch_size=8, val_every=2, keep_best="val_score", patience=2, lr=1e-2,
                      progress=False)
    result = trainer.fit(task, regression_data())
    assert result.stopped_by == "early_stop" and result.steps == 8  # 6 and 8 did not beat step 4's 1.0
    assert not torch.equal(flat(task.model), snapshots[4])
    assert trainer.restore_best() == {"metric": "val_score", "value": 1.0, "step": 4}
    assert torch.equal(flat(task.model), snapshots[4])
    without = Trainer(None, max_steps=12, batch_size=8, val_every=2, keep_best="val_score", lr=1e-2, progress=False)
    assert without.fit(Scripted(mlp(), mse, kind="toy"), regression_data()).steps == 12
    assert without.best["step"] == 12
    with pytest.raises(ValueError, match="patience .* needs keep_best and val_every"):
        Trainer(None, patience=3, keep_best="val_score")
