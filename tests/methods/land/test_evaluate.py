"""LAND (chapter 03) evaluate room: Table 1 drawn, decoded and featurised in chunks, conditions streamed; the
gates' per-volume measures on a synthetic chest, and the gates of a perfect generator (the real volumes
themselves) against a generator of shuffled voxels."""

import importlib

import numpy as np
import pytest
import torch
from land_tiny import phantom_cond, tiny_cfg

from lungsynth.data.preprocess import hu_to_unit

land_eval = importlib.import_module("lungsynth.methods.land.evaluate")  # the module; the package exports its function
gates = land_eval


class _FakeHeldout:
    """Held-out volumes made on demand; records the size of every chunk read."""

    def __init__(self, n=5):
        self.n, self.reads = n, []

    def __len__(self):
        return self.n

    def chunk(self, indices, key):
        indices = list(indices)
        self.reads.append(len(indices))
        return torch.cat([phantom_cond(16, (2 + i % self.n, 4, 4), 4) for i in indices])


def test_evaluate_never_holds_more_than_one_chunk(monkeypatch, tmp_path):
    """Sampling, decoding and features all go eval_batch volumes at a time, whatever n_samples is; the
    rows do not depend on the chunk size (each volume keeps its own noise)."""
    held = _FakeHeldout()
    calls = {"sample": [], "features": [], "conds": []}

    def fake_sample(model, cond, n, *, seed, first_index, batch, **kw):
        calls["sample"].append(n)
        calls["conds"].append(None if cond is None else cond.clone())
        assert cond is None or len(cond) == n
        vols = torch.stack([torch.full((1, 16, 16, 16), float(np.random.default_rng([seed, first_index + i]).random()))
                            for i in range(n)])
        return {"ct": vols, "seconds": 0.1 * n}

    def fake_features(data, network, intensity):
        calls["features"].append(len(data))
        x = np.asarray(data).reshape(len(data), -1)
        return np.stack([x.mean(1), x.std(1), x.max(1), x.min(1)], 1), "fake"

    monkeypatch.setattr(land_eval, "HeldoutVolumes", lambda cfg: held)
    monkeypatch.setattr(land_eval, "sample", fake_sample)
    monkeypatch.setattr(land_eval, "load", lambda cfg, variant, run_dir: object())
    monkeypatch.setattr(land_eval.fingerprint, "refuse_overlap", lambda *a, **k: None)
    monkeypatch.setattr(land_eval, "data_source", lambda cfg: "phantom")
    monkeypatch.setattr(land_eval, "prepared_root", lambda cfg: tmp_path)
    monkeypatch.setattr("lungsynth.eval.features.extract_features", fake_features)
    monkeypatch.setenv("LUNGSYNTH_HOME", str(tmp_path))

    tables = {}
    for chunk in (2, 7):
        calls["sample"].clear(), calls["features"].clear(), calls["conds"].clear(), held.reads.clear()
        cfg = tiny_cfg(16, **{"land.eval_batch": chunk})
        rows = land_eval.evaluate(cfg, ("none", "mask"), n_samples=7, memory=False, network="fake")
        assert max(calls["sample"]) <= chunk
        assert max(calls["features"]) <= chunk and max(held.reads) <= chunk
        # none once, mask on held-out and on unseen conditions, then the 5 real volumes, half against half: the
        # real row's FID is measured, never written as 0
        assert [(r["variant"], r["conditions"], r["n_samples"]) for r in rows] == [
            ("none", "-", 7), ("mask", "held-out", 7), ("mask", "unseen", 7),
            ("real (held-out)", "half against half (3 / 2)", 3)]
        assert rows[-1]["fid"] is not None and rows[-1]["kid"] is not None
        assert rows[1]["kid_ci"].startswith("insufficient N")  # 5 real volumes: no interval, and it says so
        assert sum(calls["sample"]) == 3 * 7
        given = [c for c in calls["conds"] if c is not None]  # mask: held-out chunks, then unseen ones
        half = len(given) // 2
        assert all(not torch.equal(a, b) for a, b in zip(given[:half], given[half:]))
        tables[chunk] = [(r["variant"], r["fid"], r.get("kid")) for r in rows]
    assert tables[2] == tables[7]


def test_unseen_conditions_move_resize_and_retexture_inside_the_lung():
    """The NLST stand-in: every nodule ends up >= 95% inside the lung, with one texture per volume, the lung
    itself is unchanged, and item i is edited the same whether it comes alone or in a chunk."""
    from lungsynth.nn.conditioning import lung_mask, nodule_mask, texture_map

    conds = torch.cat([phantom_cond(32, (8 + i, 10, 12 - i), 5, texture=1 + i) for i in range(4)])
    edited = land_eval.unseen_conditions(conds, first_index=0, seed=0)
    assert edited.shape == conds.shape
    for c, e in zip(conds, edited):
        nod = nodule_mask(e) > 0
        assert nod.any() and float((nod & (lung_mask(c) > 0)).sum()) >= 0.95 * float(nod.sum())
        assert torch.equal(lung_mask(c), lung_mask(e))
        assert len(texture_map(e)[nod].unique()) == 1
    assert not torch.equal(edited, conds)
    assert torch.equal(land_eval.unseen_conditions(conds[2:3], first_index=2, seed=0), edited[2:3])
    assert not torch.equal(land_eval.unseen_conditions(conds, first_index=0, seed=1), edited)


# --------------------------------------------------------------------------- quality gates

S, SPACING = 32, 2.0


def _ball(shape, centre, radius):
    grid = np.indices(shape).astype(np.float32)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2


def chest(seed=0, nodule_hu=-50.0, shift=0):
    """A synthetic chest [S,S,S] in HU (air, a soft-tissue body, two lungs, a nodule) and its condition
    volume (lung 0.1, the nodule texture 5 -> 1.0)."""
    rng = np.random.default_rng(seed)
    shape = (S, S, S)
    z, y, x = np.indices(shape)
    body = ((y - 16) / 13.0) ** 2 + ((x - 16) / 14.0) ** 2 <= 1
    lungs = _ball(shape, (16, 16, 9 + shift), 5.5) | _ball(shape, (16, 16, 23 - shift), 5.5)
    nodule = _ball(shape, (16, 16, 9 + shift), 2.2)
    hu = np.full(shape, -1000.0, np.float32)
    hu[body] = 40.0
    hu[lungs] = -850.0
    hu[nodule] = nodule_hu
    hu += rng.normal(0, 10, shape).astype(np.float32)
    cond = np.zeros(shape, np.float32)
    cond[lungs] = 0.1
    cond[nodule] = 1.0
    return hu, cond


def test_condition_nodules_keeps_those_of_6_mm_and_reads_their_texture():
    _, cond = chest()
    cond[2, 2, 2] = 0.4  # a one-voxel nodule (2.5 mm at 2 mm spacing): below the gate's 6 mm
    found = gates.condition_nodules(cond, SPACING)
    assert len(found) == 1 and found[0]["texture"] == 5 and 6.0 <= found[0]["diameter_mm"] < 12.0
    assert len(gates.condition_nodules(cond, SPACING, min_mm=0.0)) == 2


def test_nodule_contrast_is_inside_minus_the_lung_shell():
    hu, cond = chest(nodule_hu=-100.0)
    (nod,) = gates.condition_nodules(cond, SPACING)
    c = gates.nodule_contrast(hu, nod["mask"], cond > 0.05, SPACING)
    assert c == pytest.approx(750.0, abs=10.0)  # -100 inside, -850 in the shell (the body is not lung)
    flat = hu.copy()
    flat[nod["mask"]] = -850.0
    assert abs(gates.nodule_contrast(flat, nod["mask"], cond > 0.05, SPACING)) < 10.0


def test_volume_measures_of_a_real_chest_and_of_its_shuffled_voxels():
    hu, cond = chest()
    nodules = gates.condition_nodules(cond, SPACING)
    m = gates.volume_measures(hu, cond, SPACING, nodules)
    assert m["lung_dice"] > 0.85
    assert m["lung_hu"] == pytest.approx(-850.0, abs=5.0) and m["soft_hu"] == pytest.approx(40.0, abs=5.0)
    assert m["contrasts"][0] > 700.0 and m["nodule_hu"][0] == pytest.approx(-50.0, abs=5.0)
    shuffled = np.random.default_rng(0).permutation(hu.ravel()).reshape(hu.shape)
    s = gates.volume_measures(shuffled, cond, SPACING, nodules)
    assert s["lung_dice"] < 0.5 and abs(s["contrasts"][0]) < 150.0


def test_contrast_share_judges_against_half_the_real_contrast_and_skips_unmeasurable():
    share, n = gates.contrast_share([400.0, 100.0, 300.0, float("nan")], [700.0, 700.0, -20.0, 600.0])
    assert (share, n) == (0.5, 2)  # 400 >= 350 kept, 100 < 350; a negative or missing real contrast is skipped


def test_anatomy_of_none_is_judged_by_the_real_lung_fraction_range():
    real = list(np.linspace(0.10, 0.20, 20))
    inside = gates.anatomy_gate("none", [{"lung_fraction": 0.15}] * 8, [], real)
    outside = gates.anatomy_gate("none", [{"lung_fraction": 0.02}] * 8, [], real)
    few = gates.anatomy_gate("none", [{"lung_fraction": 0.15}] * 3, [], real)
    assert (inside.status, outside.status, few.status) == ("pass", "fail", "insufficient N")


def test_spearman_orders_texture_and_hu():
    assert gates.spearman([1, 2, 3, 4, 5], [-700, -500, -300, -100, 0]) == pytest.approx(1.0)
    assert np.isnan(gates.spearman([1, 1, 1], [0, 1, 2]))


class _Held:
    """Held-out synthetic chests (the nodule moves with the index), read as a prepared split would be."""

    def __init__(self, n=20):
        self.items = [chest(seed=i, shift=i % 3) for i in range(n)]

    def __len__(self):
        return len(self.items)

    def chunk(self, indices, key):
        pick = 0 if key == "ct" else 1
        vols = [self.items[int(i)][pick] for i in indices]
        if key == "ct":
            vols = [hu_to_unit(v, -1000.0, 400.0) for v in vols]
        return torch.as_tensor(np.stack(vols))[:, None].float()


class _Model:
    def __init__(self, variant, mode):
        self.variant, self.mode = variant, mode
        self.vae = _Identity()


class _Identity(torch.nn.Module):
    """The autoencoder's part in the gates: reconstruct (here exactly), on the device of its weights."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def reconstruct(self, x, roi_size=None):
        return x


def _fake_features(vols, network):
    """Block means of 8^3 voxels: features that see where the intensities are, not only which ones."""
    return torch.nn.functional.avg_pool3d(vols.float(), 8).flatten(1).numpy(), "block means"


def test_a_perfect_generator_passes_and_shuffled_voxels_fail(monkeypatch):
    """Samples that are the condition's real volume pass anatomy, intensity, nodule and KID gates; samples
    whose voxels are shuffled inside the volume fail the anatomy and nodule gates. Both are judged at the
    same N, against baselines of the same run."""
    held = _Held()

    sampled = set()

    def fake_chunks(model, held_, indices, size, seed):
        sampled.update(indices)
        for _, part in gates._chunks(indices, size):
            vols = held_.chunk(part, "ct")
            if model.mode == "shuffled":
                rng = np.random.default_rng(0)
                vols = torch.stack([v.flatten()[torch.as_tensor(rng.permutation(v.numel()))].reshape(v.shape)
                                    for v in vols])
            yield vols

    monkeypatch.setattr(gates, "HeldoutVolumes", lambda cfg: held)
    monkeypatch.setattr(gates, "_sample_chunks", fake_chunks)
    monkeypatch.setattr(gates, "_features", _fake_features)
    from lungsynth.config import get_config

    cfg = get_config("smoke", {"data.size_3d": S, "data.spacing_3d_mm": SPACING, "land.n_gate_samples": 8,
                               "land.eval_batch": 3})
    rows = gates.measure(cfg, {"mask": _Model("mask", "real"), "latentmask": _Model("latentmask", "shuffled")})
    by = {g.name: g for g in rows}
    from lungsynth.eval.baselines import halves

    assert not sampled & set(halves(len(held))[1].tolist())  # never sampled on the KID reference half
    for name in ("lung Dice, sample vs its condition", "mean HU of lung, |generated - real|",
                 "mean HU of soft tissue, |generated - real|", "KID vs held-out half"):
        assert by[f"land mask: {name}"].status == "pass", by[f"land mask: {name}"]
        assert by[f"land mask: {name}"].n == 8
    assert by["land mask: nodules >= 6 mm with >= 0.5 x real contrast"].value == 1.0
    assert by["land latentmask: lung Dice, sample vs its condition"].status == "fail"
    assert by["land latentmask: nodules >= 6 mm with >= 0.5 x real contrast"].status == "fail"
    assert by["land latentmask: KID vs held-out half"].value > by["land mask: KID vs held-out half"].value
    assert by[CEILING].value == 1.0 and by[CEILING].status == "info"  # an exact autoencoder keeps every nodule


CEILING = "land: vae3d ceiling: nodules >= 6 mm with >= 0.5 x real contrast"


class _Blur(_Identity):
    """An autoencoder that loses small detail: each reconstruction is box-blurred over 7^3 voxels."""

    def reconstruct(self, x, roi_size=None):
        return torch.nn.functional.avg_pool3d(x, 7, stride=1, padding=3, count_include_pad=False)


def test_the_nodule_ceiling_is_what_the_autoencoder_keeps(monkeypatch):
    """The ceiling row reads gate 3 on the autoencoder's reconstructions of the real volumes: a blurring
    autoencoder keeps fewer nodules at half their contrast than the real volumes themselves."""
    held = _Held()
    monkeypatch.setattr(gates, "HeldoutVolumes", lambda cfg: held)
    monkeypatch.setattr(gates, "_features", _fake_features)
    monkeypatch.setattr(gates, "_sample_chunks", lambda m, h, idx, size, seed: gates._real_chunks(h, idx, size))
    from lungsynth.config import get_config

    cfg = get_config("smoke", {"data.size_3d": S, "data.spacing_3d_mm": SPACING, "land.n_gate_samples": 8})
    blurred = _Model("mask", "real")
    blurred.vae = _Blur()
    by = {g.name: g for g in gates.measure(cfg, {"mask": blurred})}
    assert by[CEILING].n >= gates.MIN_NODULES and by[CEILING].value < 0.5


def test_untrained_variants_are_listed_with_their_command(monkeypatch, tmp_path):
    monkeypatch.setenv("LUNGSYNTH_HOME", str(tmp_path))
    from lungsynth.config import get_config

    rows = gates.quality_gates(get_config("smoke"))
    assert [g.status for g in rows] == ["not trained"] * 5
    assert "lungsynth land train --variant latentmask-texture --profile smoke" in rows[-1].detail


def test_the_noise_baseline_shuffles_the_lungs_too(monkeypatch):
    """The noise baseline shuffles every voxel of the body, lungs included. ``body_mask`` fills holes slice by
    slice and misses lungs whose air reaches the edge of a slice (most course volumes); the condition's lung
    is named as body, so the shuffled "noise" never keeps a real lung."""
    import lungsynth.eval.baselines as base
    from lungsynth.autoencoders.evaluate import body_mask
    from lungsynth.config import get_config

    cfg = get_config("smoke")
    ct = torch.full((4, 1, 16, 16, 16), 0.7)
    ct[:, :, 4:12, 4:12, 0:8] = 0.1  # a lung block that reaches the edge of every slice: no hole to fill
    cond = torch.where(ct < 0.5, torch.tensor(0.1), torch.tensor(0.0))
    lung = cond[0, 0].numpy() > 0.05
    hu0 = ct[0, 0].numpy() * (cfg.data.hu_max - cfg.data.hu_min) + cfg.data.hu_min
    assert not body_mask(hu0)[lung].any()  # the case the baseline must not miss

    class Held:
        def chunk(self, part, key):
            return (ct if key == "ct" else cond)[list(part)]

    class Identity(torch.nn.Module):
        def reconstruct(self, v, roi_size=None):
            return v

    seen = []
    shuffle = base.shuffle_in_body
    monkeypatch.setattr(base, "shuffle_in_body", lambda imgs, bodies, seed=0: (seen.append(bodies), shuffle(imgs, bodies, seed))[1])
    monkeypatch.setattr(gates, "_features", lambda vols, network: (vols.reshape(len(vols), -1)[:, ::97].double().numpy(), "toy"))
    monkeypatch.setattr(gates, "_chunk_measures", lambda *a, **k: [])
    vae = Identity()
    vae.w = torch.nn.Parameter(torch.zeros(1))
    gates._baselines(cfg, Held(), [0, 1], [2, 3], 2, "toy", vae)
    assert seen and all(b[:, lung].all() for b in seen)
