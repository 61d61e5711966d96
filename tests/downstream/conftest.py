"""Tiny fixtures for chapters 10-11: a fake prepared dataset with three subtypes and malignancy scores, and
synthetic datasets built from it by a noisy-copy 'method' (no method training anywhere)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from synth_fakes import NoisyCopy, make_fake_prepared, stamp_generator

from lungsynth.config import get_config

# train FAKE-000..007 (imbalanced subtypes), test FAKE-008..013
SUBTYPE_IDS = [0, 0, 0, 0, 0, 1, 2, 2, 0, 1, 2, 0, 1, 2]
MALIGNANCY = [1, 2, 4, 5, 1, 5, 2, 4, 1, 4, 2, 5, 3, 4]
DIAMETERS = [7.0, 12.0, 25.0, 8.0, 15.0, 9.0, 22.0, 11.0, 7.5, 12.5, 21.0, 8.5, 14.0, 26.0]
NAMES = ("solid", "part-solid", "ground-glass")

TINY = {"data.size_ddpm": 16, "data.crop_size": 16, "downstream.seg_crop_size": 16, "downstream.cls_crop_size": 16,
        "downstream.seg_channels": "4,8", "downstream.seg_steps": 2, "downstream.seg_batch_size": 2,
        "downstream.cls_init_features": 4, "downstream.cls_growth_rate": 4, "downstream.cls_blocks": "1,1",
        "downstream.cls_steps": 2, "downstream.cls_batch_size": 4, "downstream.n_runs": 2,
        "downstream.scarcity_runs": 1, "downstream.real_fractions": "0.5,0.0",
        "downstream.eval_splits": "test", "downstream.allow_repeats": False,
        "downstream.val_fraction": 0.0}  # 8 training patients: the early-stopping split is tested on its own


@pytest.fixture(scope="session")
def tiny() -> dict:
    """The overrides of :func:`cfg`, for tests that change one more value."""
    return dict(TINY)


@pytest.fixture(scope="session")
def cfg():
    return get_config("smoke", TINY)


@pytest.fixture(scope="session")
def real_root(tmp_path_factory) -> Path:
    root = make_fake_prepared(tmp_path_factory.mktemp("ds_real"), n_train=8, n_test=6, size=16)
    nod = pd.read_csv(root / "nodules.csv")
    nod["subtype_id"] = SUBTYPE_IDS
    nod["subtype"] = [NAMES[i] for i in SUBTYPE_IDS]
    nod["texture"] = [(5, 3, 1)[i] for i in SUBTYPE_IDS]
    nod["malignancy"] = MALIGNANCY
    nod["diameter_mm"] = DIAMETERS
    nod.to_csv(root / "nodules.csv", index=False)
    return root


def _synth(cfg, real_root: Path, out: Path, conditions: str, n: int) -> Path:
    from lungsynth.sampling.synth import synthesize

    generator = stamp_generator(out.parent / f"generator_{out.name}", real_root)  # trained on the train split
    synthesize(cfg, NoisyCopy("volume"), n, conditions=conditions, out=out, checkpoint=generator, real_root=real_root,
               progress=False, model="model")
    return out


@pytest.fixture(scope="session")
def synthetic_train(cfg, real_root, tmp_path_factory) -> Path:
    """8 synthetic volumes conditioned on training masks (conditions="sampler")."""
    return _synth(cfg, real_root, tmp_path_factory.mktemp("ds_syn") / "sampler", "sampler", 8)


@pytest.fixture(scope="session")
def synthetic_heldout(cfg, real_root, tmp_path_factory) -> Path:
    """3 synthetic volumes conditioned on test-split masks: a leak when used for training."""
    return _synth(cfg, real_root, tmp_path_factory.mktemp("ds_syn") / "heldout", "heldout", 3)
