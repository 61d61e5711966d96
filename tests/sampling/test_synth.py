"""Chapter 08: synthetic datasets in the prepared format, resumable sampling, the method registry."""

import json

import numpy as np
import pandas as pd
import pytest
from synth_fakes import NaNMethod, NoisyCopy, make_fake_prepared

from lungsynth.config import get_config
from lungsynth.sampling.registry import METHODS, available_methods
from lungsynth.sampling.synth import synthesize


@pytest.fixture(scope="session")
def real_root(tmp_path_factory):
    return make_fake_prepared(tmp_path_factory.mktemp("fake_prepared"))


@pytest.fixture(scope="session")
def cfg():
    return get_config("smoke")


def _run(cfg, real_root, out, adapter, n=5, **kw):
    return synthesize(cfg, adapter, n, out=out, checkpoint=real_root, batch_size=kw.pop("batch_size", 1),
                      real_root=real_root, progress=False, **kw)


def test_synthetic_volumes_load_with_real_loaders(cfg, real_root, tmp_path):
    from lungsynth.data.datasets import VolumeDataset, load_nodules

    res = _run(cfg, real_root, tmp_path / "syn", NoisyCopy(), n=4, batch_size=3)
    assert res.generated == 4 and res.skipped == 0
    ds = VolumeDataset(cfg, "train", root=res.out, keys=("ct", "lung", "label", "cond", "hrmask"))
    assert len(ds) == 4
    item = ds[0]
    assert item["ct"].shape == (1, 16, 16, 16) and item["hrmask"].shape == (3, 16, 16, 16)
    assert 0.0 <= float(item["ct"].min()) and float(item["ct"].max()) <= 1.0
    # provenance: which real scan's masks were used, and the label map is that scan's
    prov = pd.read_csv(res.out / "provenance.csv")
    assert list(prov["condition_source"].unique()) == ["heldout"]
    test_ids = pd.read_csv(real_root / "scans.csv").query("split == 'test'")["scan_id"].tolist()
    assert prov["condition_scan_id"].tolist() == test_ids[:4]
    real = VolumeDataset(cfg, "test", root=real_root)[0]
    assert bool((item["label"] == real["label"]).all())
    nod = load_nodules(res.out)
    assert set(nod["real_nodule_id"]) <= set(pd.read_csv(real_root / "nodules.csv")["nodule_id"])
    assert {"method", "checkpoint", "seed", "batch_seed"} <= set(json.loads(
        (res.out / "records" / "syn-noisycopy-00000.json").read_text()))


def test_synthetic_slices_load_with_slice_dataset(cfg, real_root, tmp_path):
    from lungsynth.data.datasets import SliceDataset

    res = _run(cfg, real_root, tmp_path / "syn2d", NoisyCopy(unit="slice"), n=3)
    ds = SliceDataset(cfg, "train", root=res.out)
    assert len(ds) == 3
    it = ds[1]
    assert it["image"].shape == (1, 16, 16) and it["box"].sum() > 0
    assert it["attributes"].tolist() == [4, 4, 2, 1, 5]


def test_resume_after_kill_redoes_nothing_and_matches(cfg, real_root, tmp_path):
    fresh = _run(cfg, real_root, tmp_path / "a" / "syn", NoisyCopy(), n=5)
    killed = NoisyCopy(fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        _run(cfg, real_root, tmp_path / "b" / "syn", killed, n=5)
    partial = tmp_path / "b" / "syn"
    assert len(list((partial / "records").glob("*.json"))) == 2
    assert len(pd.read_csv(partial / "scans.csv")) == 2  # the tables hold what was finished
    again = NoisyCopy()
    res = _run(cfg, real_root, partial, again, n=5)
    assert (res.generated, res.skipped, again.calls) == (3, 2, 3)
    import nibabel as nib

    for i in range(5):
        f = f"volumes/syn-noisycopy-{i:05d}_ct.nii.gz"
        a = np.asanyarray(nib.load(str(fresh.out / f)).dataobj)
        b = np.asanyarray(nib.load(str(res.out / f)).dataobj)
        np.testing.assert_array_equal(a, b)
    third = NoisyCopy()
    assert _run(cfg, real_root, partial, third, n=5).generated == 0 and third.calls == 0


def test_bad_input(cfg, real_root, tmp_path):
    with pytest.raises(ValueError, match="NaN"):
        _run(cfg, real_root, tmp_path / "nan", NaNMethod(), n=1)
    assert not list((tmp_path / "nan" / "records").glob("*.json"))
    with pytest.raises(ValueError, match="other settings"):
        _run(cfg, real_root, tmp_path / "nan", NoisyCopy(), n=1, seed=7)
    with pytest.raises(ValueError, match="n must be"):
        _run(cfg, real_root, tmp_path / "x", NoisyCopy(), n=0)
    with pytest.raises(ValueError, match="unknown method"):
        synthesize(cfg, "no-such-method", 1)


def test_registry_lists_the_methods_that_exist():
    assert {"land", "bbox_ldm", "hr_ldm", "lung_ddpm", "text2img"} <= set(METHODS)
    for name in available_methods():
        a = METHODS[name]
        assert a.unit in ("volume", "slice", "roi", "crop") and a.available()


def test_default_dataset_is_resampled_when_the_weights_change(cfg, real_root, tmp_path):
    """A chapter's folder (under runs/<profile>/synthetic) is extended only by the same weights: a retrained model
    at the same run path samples anew rather than topping up the old model's samples; a folder elsewhere refuses."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "final.pt").write_bytes(b"weights one")
    first = synthesize(cfg, NoisyCopy(), 2, checkpoint=run, batch_size=1, real_root=real_root, progress=False)
    assert first.generated == 2
    again = synthesize(cfg, NoisyCopy(), 3, checkpoint=run, batch_size=1, real_root=real_root, progress=False)
    assert (again.generated, again.skipped) == (1, 2)  # same weights: resumed and extended
    (run / "final.pt").write_bytes(b"weights two")
    retrained = synthesize(cfg, NoisyCopy(), 3, checkpoint=run, batch_size=1, real_root=real_root, progress=False)
    assert retrained.out == first.out and (retrained.generated, retrained.skipped) == (3, 0)
    explicit = tmp_path / "mine"
    synthesize(cfg, NoisyCopy(), 1, out=explicit, checkpoint=run, batch_size=1, real_root=real_root, progress=False)
    (run / "final.pt").write_bytes(b"weights three")
    with pytest.raises(ValueError, match="weights"):
        synthesize(cfg, NoisyCopy(), 1, out=explicit, checkpoint=run, batch_size=1, real_root=real_root,
                   progress=False)
