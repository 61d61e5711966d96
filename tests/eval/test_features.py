"""lungsynth/eval/features.py: input checks, the packaged Astra encoder, 2.5D slices, the slice net."""

from pathlib import Path

import numpy as np
import pytest
import torch

from lungsynth.eval import features as F


def _phantom(n, size=32, seed=0):
    """HU volumes: air outside, a soft-tissue body with two dark lungs and a bright blob; [n, S, S, S]."""
    rng = np.random.default_rng(seed)
    g = np.mgrid[:size, :size, :size].astype(np.float32) / size - 0.5
    r = np.sqrt(g[1] ** 2 + g[2] ** 2)
    vols = []
    for _ in range(n):
        v = np.full((size,) * 3, -1000.0, np.float32)
        v[r < 0.45] = 40.0
        for sx in (-0.18, 0.18):
            v[((g[2] - sx) ** 2 / 0.02 + g[1] ** 2 / 0.08 + g[0] ** 2 / 0.2) < 1] = -850.0
        c = rng.uniform(-0.1, 0.1, 3)
        v[((g[0] - c[0]) ** 2 + (g[1] - c[1]) ** 2 + (g[2] - 0.18 - c[2]) ** 2) < 0.004] = 20.0
        vols.append(v + rng.normal(0, 20, v.shape).astype(np.float32))
    return np.stack(vols)


def test_intensity_checks_and_nan():
    hu = _phantom(1)
    assert np.allclose(F.to_hu(np.full((2, 4, 4, 4), 0.5), "unit"), -300.0)
    with pytest.raises(ValueError, match="intensity='hu'"):
        F.to_hu(hu, "unit")
    with pytest.raises(ValueError, match="looks like the"):
        F.to_hu(np.random.rand(1, 4, 4, 4), "hu")
    bad = hu.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        F.to_hu(bad, "hu")
    with pytest.raises(ValueError, match="expected"):
        F.astra_features(np.zeros((2, 2, 4, 4, 4)) - 1000, "hu")
    assert F.hu_to_astra(np.array([-2000.0, -1000.0, -400.0, 200.0, 900.0])).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_centre_slices_and_ras_orientation():
    v = np.zeros((2, 4, 6, 8), np.float32)  # [N, D, H, W]
    planes = F.centre_slices(v)
    assert planes["axial"].shape == (2, 6, 8)
    assert planes["coronal"].shape == (2, 4, 8) and planes["sagittal"].shape == (2, 4, 6)
    v = np.arange(4 * 6 * 8, dtype=np.float32).reshape(1, 4, 6, 8)
    assert np.array_equal(F.centre_slices(v)["axial"][0], v[0, 2])
    # dhw = (S->I, A->P, R->L) -> RAS [X, Y, Z]: the most superior, anterior, right voxel v[0, 0, 0] has the
    # largest Z, largest Y and largest X index
    ras = F.to_ras(v)
    assert ras.shape == (1, 8, 6, 4) and ras[0, -1, -1, -1] == v[0, 0, 0, 0] and ras[0, 0, 0, 0] == v[0, -1, -1, -1]
    assert F.to_ras(v, "ras") is not None and np.array_equal(F.to_ras(v, "ras"), v)
    ras_planes = F.centre_slices(ras, "ras")
    assert np.array_equal(ras_planes["axial"][0], np.flip(v[0, 1].T))  # Z//2 = 2 in RAS is D index 1
    with pytest.raises(ValueError, match="layout"):
        F.to_ras(v, "lps")


def test_astra_features(astra_encoder):
    vols = _phantom(2, 32)
    feats, name = F.astra_features(vols, "hu", batch_size=2)
    assert name == "astra-i3resnet152/3d"
    assert feats.shape == (2, F.ASTRA_DIM) and feats.dtype == np.float64 and np.isfinite(feats).all()
    assert not np.allclose(feats[0], feats[1])
    # one volume alone, given on the course's [0, 1] scale as a torch tensor [N, 1, X, Y, Z]: same features
    unit = (np.clip(vols[:1], -1000, 400) + 1000) / 1400
    u, _ = F.astra_features(torch.from_numpy(unit)[:, None], "unit", batch_size=1)
    assert np.allclose(u[0], feats[0], rtol=1e-3, atol=1e-4)
    assert F.load_astra_encoder("cpu") is astra_encoder  # cached in-process


def test_astra_25d(astra_encoder):
    planes, name = F.features_25d(_phantom(2, 32), "hu", network="astra", slab=2)
    assert name == "astra-i3resnet152/2.5d-slab2"
    assert set(planes) == set(F.PLANES)
    assert all(p.shape == (2, F.ASTRA_DIM) and np.isfinite(p).all() for p in planes.values())


def test_slice_net_random_fallback_is_deterministic_and_named():
    slices = np.random.default_rng(0).random((5, 1, 32, 32)).astype(np.float32)
    a, name = F.slice_features(slices)
    b, _ = F.slice_features(slices)
    assert name == "slicenet2d-random-s0" and a.shape == (5, 128) and a.dtype == np.float64
    assert np.array_equal(a, b)
    c, name1 = F.slice_features(slices, seed=1)
    assert name1 == "slicenet2d-random-s1" and not np.allclose(a, c)
    planes, name25 = F.features_25d(_phantom(2, 16), "hu", network="slicenet2d")
    assert name25 == "slicenet2d-random-s0/2.5d" and planes["axial"].shape == (2, 128)


def test_train_slice_net_learns_rotation(tmp_path):
    axial = F.centre_slices(_phantom(12, 32))["axial"]
    coronal = F.centre_slices(_phantom(12, 32, seed=1))["coronal"]
    slices = F.hu_to_astra(np.concatenate([axial, coronal]))[:, None]
    net = F.train_slice_net(slices, steps=40, batch_size=16, lr=3e-3, width=8, feature_dim=32,
                            run_dir=tmp_path / "slicenet", device="cpu", progress=False)
    assert net.final_loss < 1.2  # chance level is ln 4 = 1.386
    feats, name = F.slice_features(slices, net, intensity="astra")
    assert name == "slicenet2d-rot-40steps-s0" and feats.shape == (24, 32)
    again, name2 = F.slice_features(slices, F.load_slice_net(tmp_path / "slicenet"), intensity="astra")
    assert name2 == name and np.allclose(again, feats, atol=1e-6)
    with pytest.raises(ValueError, match="square"):
        F.train_slice_net(np.zeros((4, 1, 8, 6)), steps=1)
    with pytest.raises(FileNotFoundError, match="train_slice_net"):
        F.load_slice_net(tmp_path / "nothing")


def test_extract_features_dispatch():
    slices = np.random.default_rng(0).random((3, 1, 16, 16))
    f, name = F.extract_features(slices, "slicenet2d", "unit")
    assert f.shape == (3, 128) and name.startswith("slicenet2d")
    with pytest.raises(ValueError, match="unknown feature network"):
        F.extract_features(slices, "inception", "unit")


def test_feature_cache_encodes_each_input_once_per_network(tmp_path, monkeypatch):
    """Rows come back from the cache for inputs seen before by the same network; a changed item, another
    network name or a cache turned off goes through the encoder again."""
    monkeypatch.setenv("LUNGSYNTH_HOME", str(tmp_path))
    calls = []

    def encode(x):
        calls.append(len(x))
        return x.reshape(len(x), -1).sum(1, keepdims=True).astype(np.float64) * np.arange(1, 4)

    items = np.random.default_rng(0).random((4, 3, 3, 3)).astype(np.float32)
    first = F.cached_features(items, "net-a", encode)
    assert calls == [4] and np.allclose(first, encode(items))
    calls.clear()
    assert np.array_equal(F.cached_features(items, "net-a", encode), first) and calls == []
    changed = items.copy()
    changed[2, 0, 0, 0] += 1.0
    again = F.cached_features(changed, "net-a", encode)
    assert calls == [1] and np.array_equal(again[[0, 1, 3]], first[[0, 1, 3]]) and again[2, 0] == first[2, 0] + 1.0
    calls.clear()
    F.cached_features(items, "net-b", encode)
    assert calls == [4]
    monkeypatch.setenv("LUNGSYNTH_FEATURE_CACHE", "off")
    calls.clear()
    F.cached_features(items, "net-a", encode)
    assert calls == [4] and not list(tmp_path.rglob("*.tmp"))


def _slow_join(weights: str, target_dir: str) -> str:
    """The weights package's join in miniature: write ``<name>.part`` in pieces, then rename it; a second
    process that also starts writing truncates the part file, as the real join would."""
    import time as _time

    target = Path(target_dir) / f"{weights}.pt"
    if target.exists():
        return str(target)
    part = target.with_suffix(".part")
    with open(part, "wb") as f:
        for _ in range(20):
            f.write(b"x" * 1000)
            f.flush()
            _time.sleep(0.01)
    part.rename(target)
    return str(target)


def _join_in(cache: str, start, results) -> None:
    from lungsynth.eval.features import joined_weights

    start.wait()  # both processes imported and ready: they join at the same moment
    results.put(joined_weights(_slow_join, "astra", Path(cache)))


def test_two_processes_joining_the_encoder_weights_leave_one_whole_file(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    start, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_join_in, args=(str(tmp_path), start, results)) for _ in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    paths = [results.get(timeout=5) for _ in procs if not results.empty()]
    assert len(paths) == 2 and paths[0] == paths[1], paths  # without the lock one rename finds no part file
    assert Path(paths[0]).stat().st_size == 20 * 1000
    assert not list(tmp_path.glob("*.part"))
