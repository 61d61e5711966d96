"""Functions the runtime tests run in child processes (``tests/`` is put on the child's PYTHONPATH)."""

from __future__ import annotations

import resource
from typing import Any

import numpy as np

from lungsynth.runtime import peak_rss_mb


def peak_after_allocating(spec: dict[str, Any]) -> dict[str, float]:
    """Touch ``spec["mb"]`` MB, free it, and report this process's peak two ways."""
    ballast = np.ones(int(spec["mb"]) * 2**20 // 8)
    del ballast
    return {"peak_mb": peak_rss_mb(), "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def fail_on_purpose(spec: Any) -> None:
    raise ValueError(f"this probe fails on purpose ({spec})")


def imported_before_the_call(spec: dict[str, Any]) -> bool:
    """Whether module ``spec["module"]`` was already imported when this call began."""
    import sys

    return spec["module"] in sys.modules


def square_in_worker(x: int) -> dict[str, int]:
    """``x * x`` with the process id and the threads torch would use there."""
    import os

    import torch

    return {"square": x * x, "pid": os.getpid(), "threads": torch.get_num_threads()}
