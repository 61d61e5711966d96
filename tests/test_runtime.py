import json

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


def test_cpu_runs_in_fp32(monkeypatch):
    monkeypatch.setenv("LUNGSYNTH_DEVICE", "cpu")
    assert runtime.device().type == "cpu"
    assert runtime.autocast_dtype() is None
    with runtime.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


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
