import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lungsynth import runtime


def test_seed_everything_is_reproducible():
    runtime.seed_everything(123)
    a = (torch.rand(3), np.random.rand(3))
    runtime.seed_everything(123)
    b = (torch.rand(3), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])


AMX = {"fpu", "avx2", "avx512f", "amx_bf16", "amx_tile"}
AVX2_ONLY = {"fpu", "avx2", "fma"}


def test_auto_precision_follows_the_cpu_flags(monkeypatch):
    monkeypatch.delenv("LUNGSYNTH_PRECISION", raising=False)
    cpu = torch.device("cpu")
    fast = runtime.choose_precision(cpu, "auto", flags=AMX)
    assert fast.name == "bf16" and "amx_bf16" in fast.reason and fast.dtype == torch.bfloat16
    # AVX512-BF16 without AMX: measured NaN 3D gradients and no gain in 2D, so fp32
    no_amx = runtime.choose_precision(cpu, None, flags={"avx512f", "avx512_bf16"})
    assert no_amx.name == "fp32" and "avx512_bf16" in no_amx.reason
    slow = runtime.choose_precision(cpu, "auto", flags=AVX2_ONLY)
    assert slow.name == "fp32" and slow.dtype is None and "no amx_bf16" in slow.reason


def test_a_model_can_name_more_cpus_where_auto_picks_bf16(monkeypatch):
    """A model measured safe in bf16 on AVX512-BF16 without AMX passes its own flags; the default stays AMX."""
    monkeypatch.delenv("LUNGSYNTH_PRECISION", raising=False)
    cpu, avx512 = torch.device("cpu"), {"avx512f", "avx512_bf16"}
    wider = ("amx_bf16", "avx512_bf16")
    assert runtime.choose_precision(cpu, "auto", flags=avx512).name == "fp32"
    chosen = runtime.choose_precision(cpu, "auto", flags=avx512, bf16_flags=wider)
    assert chosen.name == "bf16" and "avx512_bf16" in chosen.reason
    assert runtime.choose_precision(cpu, "auto", flags=AVX2_ONLY, bf16_flags=wider).name == "fp32"
    monkeypatch.setenv("LUNGSYNTH_PRECISION", "fp32")  # the env var still wins over auto
    assert runtime.choose_precision(cpu, "auto", flags=avx512, bf16_flags=wider).name == "fp32"


def test_bf16_asked_on_avx512_bf16_runs_without_the_emulation_warning(monkeypatch):
    import warnings

    monkeypatch.setattr(runtime, "_warned", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert runtime.choose_precision(torch.device("cpu"), "bf16", flags={"avx512_bf16"}).name == "bf16"


def test_cpuinfo_flags_are_read(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert runtime.cpu_flags(info) == {"fpu", "avx2", "amx_bf16"}
    assert runtime.fast_cpu_bf16(runtime.cpu_flags(info)) == "amx_bf16"
    assert runtime.cpu_flags(tmp_path / "missing") == set()


def test_env_and_config_key_override_auto(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("LUNGSYNTH_PRECISION", "fp32")
    assert runtime.choose_precision(cpu, "auto", flags=AMX).name == "fp32"  # the env var wins over auto
    assert runtime.choose_precision(cpu, "bf16", flags=AMX).name == "bf16"  # a set config key wins
    with runtime.autocast(cpu):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    monkeypatch.setenv("LUNGSYNTH_PRECISION", "half")
    with pytest.raises(ValueError, match="auto, bf16, fp32"):
        runtime.choose_precision(cpu)
    with pytest.raises(ValueError, match="engine.precision"):
        runtime.choose_precision(cpu, "fp16")


def test_bf16_on_a_cpu_without_support_runs_with_one_warning(monkeypatch):
    monkeypatch.setattr(runtime, "_warned", set())
    cpu = torch.device("cpu")
    with pytest.warns(RuntimeWarning, match="emulated"):
        assert runtime.choose_precision(cpu, "bf16", flags=AVX2_ONLY).name == "bf16"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runtime.choose_precision(cpu, "bf16", flags=AVX2_ONLY)  # warned once already


def test_a_bf16_training_step_is_finite_and_close_to_fp32(monkeypatch):
    from lungsynth.engine import Trainer, TrainTask

    monkeypatch.setattr(runtime, "_warned", {"cpu-bf16"})  # no warning on a CPU without bf16 units

    class Regression(TrainTask):
        kind = "regression"

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.SiLU(),
                                           torch.nn.Conv2d(8, 1, 3, padding=1))

        def modules(self):
            return {"net": self.net}

        def training_step(self, batch, step):
            self.seen = self.net(batch["x"]).dtype
            return {"loss": torch.nn.functional.mse_loss(self.net(batch["x"]), batch["x"].flip(-1))}

    gen = torch.Generator().manual_seed(0)
    data = [{"x": torch.rand(1, 16, 16, generator=gen)} for _ in range(8)]
    losses, dtypes = {}, {}  # the fp32 loss after 4 steps, and the dtype the network computed in
    for name in ("fp32", "bf16"):
        task = Regression()
        Trainer(None, max_steps=4, batch_size=4, lr=1e-2, precision=name, progress=False,
                device="cpu").fit(task, data)
        dtypes[name] = task.seen
        with torch.no_grad():
            losses[name] = float(torch.nn.functional.mse_loss(task.net(data[0]["x"][None]), data[0]["x"][None].flip(-1)))
    assert dtypes == {"fp32": torch.float32, "bf16": torch.bfloat16}
    assert np.isfinite(losses["bf16"]) and abs(losses["bf16"] - losses["fp32"]) < 0.05 * losses["fp32"]


def test_run_record_writes_config_versions_and_timings(tmp_path):
    with runtime.RunRecord(tmp_path, config={"a": 1, "t": (1, 2)}, seed=5, command="unit") as record:
        with record.timer("stage"):
            pass
        record["metric"] = np.float32(0.5)
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["status"] == "ok" and data["seed"] == 5 and data["config"] == {"a": 1, "t": [1, 2]}
    assert data["versions"]["torch"].startswith("2.13") and "stage" in data["timings_s"]
    assert data["results"]["metric"] == 0.5 and data["timings_s"]["total"] >= 0


def test_run_record_marks_failures(tmp_path):
    with pytest.raises(RuntimeError):
        with runtime.RunRecord(tmp_path, config=None, seed=0):
            raise RuntimeError("boom")
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["status"].startswith("failed: RuntimeError: boom")


def test_environment_report_lists_weights():
    report = runtime.environment_report()
    assert report["device"] in ("cpu", "cuda")
    assert any("I3ResNet" in name for name in report["optional_weights"])


def test_compare_precisions_reports_speedup_and_loss_agreement(monkeypatch, capsys):
    calls = []

    def fake_child(target, spec, precision=None, timeout=None):
        calls.append((target, spec["what"], precision))
        if spec["what"] == "train":
            losses = [1.0, 0.8] if precision == "fp32" else ([1.0, 0.79] if spec["close"] else [1.0, 1.2])
            return {"seconds": 2.0 if precision == "fp32" else 0.5, "losses": losses, "skipped_steps": 0}
        return {"seconds": 3.0 if precision == "fp32" else 6.0}

    monkeypatch.setattr(runtime, "run_child", fake_child)
    rows = runtime.compare_precisions("m:f", {"train": {"what": "train", "close": True},
                                              "drift": {"what": "train", "close": False},
                                              "sample": {"what": "sample"}})
    assert [c[2] for c in calls] == ["fp32", "bf16"] * 3
    train, drift, sample = rows
    assert train["speedup"] == pytest.approx(4.0) and train["agree"]
    assert train["loss_rel_diff"] == pytest.approx(abs(0.895 - 0.9) / 0.9)
    assert not drift["agree"] and "DIFFER" in capsys.readouterr().out
    assert sample["speedup"] == pytest.approx(0.5) and "agree" not in sample


def test_run_child_runs_a_function_in_a_fresh_process_with_the_precision():
    assert runtime.run_child("builtins:dict", {"what": "echo", "n": 3}) == {"what": "echo", "n": 3}
    assert runtime.run_child("os:getenv", runtime.PRECISION_ENV, precision="bf16") == "bf16"
    with pytest.raises(ValueError, match="valid"):
        runtime.run_child("builtins:dict", {}, precision="fp16")
    with pytest.raises(RuntimeError, match="failed with code"):
        runtime.run_child("builtins:dict", "not a mapping")


@pytest.fixture
def child_probes(monkeypatch):
    """Children started by run_child / run_forked can import tests/child_probes.py."""
    here = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    return "child_probes"


def test_a_child_reports_its_own_peak_memory_not_its_parents(child_probes):
    ballast = np.ones(2**30 // 8)  # 1 GiB resident in this process while the child runs
    child = runtime.run_child(f"{child_probes}:peak_after_allocating", {"mb": 0})
    assert ballast[-1] == 1.0
    # the trap peak_rss_mb avoids: ru_maxrss of a child starts at its parent's resident size
    assert child["ru_maxrss_mb"] >= 1024
    assert child["peak_mb"] < 700  # Python, numpy and torch imported: a few hundred MB


def test_forked_calls_start_from_the_same_imports_and_keep_their_order(child_probes):
    big, small = runtime.run_forked(f"{child_probes}:peak_after_allocating", [{"mb": 400}, {"mb": 0}])
    assert big["peak_mb"] >= small["peak_mb"] + 350  # the second call does not inherit the first one's peak
    assert small["peak_mb"] < 700


def test_forked_calls_start_with_the_preloaded_modules_imported(child_probes):
    """LAND's memory table preloads MONAI this way: one import before the forks instead of one per variant."""
    probe, spec = f"{child_probes}:imported_before_the_call", {"module": "colorsys"}  # imported by nothing here
    assert runtime.run_forked(probe, [spec, spec], preload=["colorsys"]) == [True, True]
    assert runtime.run_forked(probe, [spec]) == [False]


def test_a_failing_or_hung_forked_call_raises(child_probes):
    with pytest.raises(RuntimeError, match="fails on purpose"):
        runtime.run_forked(f"{child_probes}:fail_on_purpose", ["x"])
    with pytest.raises(RuntimeError, match="gave nothing in 2 s"):
        runtime.run_forked("time:sleep", [60], timeout=2)


def test_data_workers_keep_the_order_use_one_thread_each_and_raise_a_workers_error(child_probes):
    import importlib

    probes = importlib.import_module(child_probes)
    out = list(runtime.map_in_processes(probes.square_in_worker, [3, 1, 4, 1, 5], workers=2))
    assert [o["square"] for o in out] == [9, 1, 16, 1, 25]
    assert os.getpid() not in {o["pid"] for o in out} and len({o["pid"] for o in out}) <= 2
    assert {o["threads"] for o in out} == {1}  # two workers on two cores: one thread each
    inline = list(runtime.map_in_processes(probes.square_in_worker, [2], workers=2))  # one item: no process
    assert inline[0]["pid"] == os.getpid()
    with pytest.raises(ValueError, match="fails on purpose"):
        list(runtime.map_in_processes(probes.fail_on_purpose, ["a", "b"], workers=2))
    with pytest.raises(ValueError, match="at least 1"):
        runtime.data_workers(0)
    assert 1 <= runtime.data_workers() <= runtime.DATA_WORKERS_CAP
