"""Chapter 09: the leaderboard on a tiny fake real dataset with fake methods."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from by_hand import dice_by_hand, frechet_by_hand, gaussian_mmd2_by_hand
from synth_fakes import NoisyCopy, make_fake_prepared, stamp_generator

from lungsynth.config import get_config
from lungsynth.eval.features import unit_features
from lungsynth.eval.fidelity import generated_nodule
from lungsynth.leaderboard import build_leaderboard, evaluate_method, load_synthetic, write_leaderboard
from lungsynth.sampling import registry


class Trained(NoisyCopy):
    def __init__(self, run, root, **kw):
        super().__init__(**kw)
        self.run, self.root = run, root

    def run_dir(self, cfg):
        return self.run

    def ensure_trained(self, cfg):
        (self.run / "final.pt").write_bytes(b"")
        stamp_generator(self.run, self.root)
        return self.run


@pytest.fixture(scope="module")
def setup(tmp_path_factory, monkeypatch_module):
    root = make_fake_prepared(tmp_path_factory.mktemp("real"), n_train=8, n_test=6, n_val=3)
    runs = tmp_path_factory.mktemp("runs")
    cfg = get_config("smoke", {"evaluation.feature_network": "slicenet2d-2.5d", "evaluation.n_samples": 6,
                               "evaluation.bootstrap": 5, "evaluation.slice_net_steps": 5})
    vol = Trained(runs / "vol", root, name="fakevol", noise_hu=30.0)
    (runs / "vol").mkdir()
    (runs / "vol" / "final.pt").write_bytes(b"")
    stamp_generator(runs / "vol", root)
    sl = Trained(runs / "sl", root, name="fakeslice", unit="slice")
    (runs / "sl").mkdir()
    untrained = Trained(runs / "none", root, name="fakeuntrained")
    monkeypatch_module.setattr(registry, "METHODS", {a.name: a for a in (vol, sl, untrained)})
    return cfg, root, runs


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_leaderboard_for_the_methods_present(setup, tmp_path):
    cfg, root, runs = setup
    res = build_leaderboard(cfg, real_root=root)
    # the untrained ones are skipped (sl has no final.pt); a volume method's nodules give it a nodule-crop row; the
    # baselines of each reference follow the methods
    baselines = [f"baseline {u}: {b}" for u in ("volume", "nodule")
                 for b in ("real vs real", "blurred real", "shuffled-pixel noise")]
    assert list(res) == ["fakevol", "fakevol (nodule crops)", *baselines]
    row = res["fakevol"].row
    # 6 held-out volumes: a reference half of 3, the baselines' half of 3
    assert row["n_synthetic"] == 6 and row["n_real"] == 3 and "slicenet2d" in row["network"]
    assert row["fid_ci"] == "insufficient N"  # 3 reference volumes: too few for an interval, and it says so
    assert ev_interval_note(res["fakevol"]).startswith("insufficient N: an interval needs >= 8")
    # the samples were conditioned on validation scans: none of them is in the reference or the baselines' half
    conditioned = {r["condition_scan_id"] for r in load_synthetic(Path(res["fakevol"].details["synthetic_dir"]))[
        "records"]}
    assert conditioned and all(s.split("_")[0] in [f"FAKE-{i:03d}" for i in (14, 15, 16)] for s in conditioned)
    assert row["masked_mse"] is not None and row["masked_mse"] > 0
    assert row["jsd_solid"] is not None and row["jsd_ground-glass"] is None
    # FID, MMD and Dice recomputed by hand from what was sampled and what it is compared with
    ev = res["fakevol"]
    f_real, f_syn = (unit_features(cfg, "volume", a)[0] for a in (ev.reference, ev.synthetic))
    assert row["fid"] == pytest.approx(frechet_by_hand(f_real, f_syn), rel=1e-4) and row["fid"] > 0
    assert row["mmd"] == pytest.approx(gaussian_mmd2_by_hand(f_real, f_syn), rel=1e-4) and row["mmd"] > 0
    masks = load_synthetic(Path(ev.details["synthetic_dir"]))["mask"]
    dices = [dice_by_hand(generated_nodule(v, m, cfg.evaluation.dice_threshold_hu), m > 0.5)
             for v, m in zip(ev.synthetic, masks)]
    assert row["dice"] == pytest.approx(np.mean(dices)) and 0 < row["dice"] <= 1
    # noisy copies of validation scans are not copies of training scans
    assert not ev.memorization_voxel.memorizes and not ev.memorization.memorizes
    # 6 samples are too few for the two-sample classifier: reported as insufficient, never a number
    assert np.isnan(row["c2st"]) and ev.details["two_sample"]["extra"]["insufficient"]
    files = write_leaderboard(res, tmp_path, "smoke")
    md = files["md"].read_text()
    assert "| fakevol" in md and "FID" in md and "| *baseline: real vs real* |" in md
    assert md.startswith("# Leaderboard (smoke, fake)") and row["source"] == "fake"  # the data source in the title
    data = json.loads(files["json"].read_text())["details"]["fakevol"]["data"]
    assert data["id"] == json.loads((root / "fingerprint.json").read_text())["id"]
    assert data["trained_on"]["patients"] == [f"FAKE-{i:03d}" for i in range(8)]  # the generator's, recorded
    assert pd.read_csv(files["csv"])["method"].tolist() == ["fakevol", "fakevol"] + [
        "baseline: real vs real", "baseline: blurred real", "baseline: shuffled-pixel noise"] * 2
    assert json.loads(files["json"].read_text())["details"]["fakevol"]["memorization"]["n_synthetic"] == 6


def ev_interval_note(ev):
    return ev.details["distribution"]["fid"]["extra"]["interval"]


def test_a_sample_conditioned_on_a_reference_scan_is_refused(setup, tmp_path):
    """Scoring a method against the scans it was conditioned on or inpainted into flatters it (HR-LDM's FID of 3.75
    against LAND's 315 measured that overlap): the board refuses such a synthetic set before any metric."""
    cfg, root, runs = setup

    class OnTestScans(Trained):
        def conditions(self, cfg, source, n, seed=0, root=None):
            from lungsynth.data.conditions import real_conditions

            return real_conditions(cfg, "volume", n, source="heldout", root=root)

    with pytest.raises(ValueError, match="conditioned on scans of the (real|comparison) reference"):
        evaluate_method(cfg, OnTestScans(runs / "vol", root, name="ontest"), n=6, real_root=root,
                        out=tmp_path / "ontest")


def test_train_missing_and_2d_rows(setup, tmp_path):
    cfg, root, runs = setup
    res = build_leaderboard(cfg, ["fakeslice"], real_root=root, train_missing=True, n=4)
    row = res["fakeslice"].row
    assert row["unit"] == "slice" and row["network"].startswith("slicenet2d-rot-5steps")
    assert row["masked_mse"] is None and row["n_synthetic"] == 4


def test_memorising_method_is_flagged(setup, tmp_path):
    cfg, root, runs = setup

    class Copier(Trained):
        def conditions(self, cfg, source, n, seed=0, root=None):  # copies TRAINING scans
            from lungsynth.data.conditions import real_conditions

            return real_conditions(cfg, "volume", n, source="heldout", root=root, split="train")

    # 12 copies against 3 held-out volumes: the permutation test can reach p = 1 / C(15, 3) < 0.01 (with 6 copies
    # its smallest p-value, 1 / C(9, 3) = 0.012, could never declare memorisation at alpha = 0.01)
    ev = evaluate_method(cfg, Copier(runs / "vol", root, name="copier", noise_hu=1.0), n=12, real_root=root,
                         out=tmp_path / "copier")
    assert ev.memorization_voxel.flag_rate == 1.0 and ev.memorization_voxel.memorizes
    assert ev.row["memorization_flag_rate"] >= 0.5


def test_empty_leaderboard_is_written(tmp_path):
    files = write_leaderboard({}, tmp_path, "smoke")
    assert "no trained method" in files["md"].read_text()


def test_a_generator_is_never_scored_on_its_training_patients(setup, tmp_path):
    """The leaderboard scores on the test split: a generator whose data stamp lists a test patient, or
    that has no stamp at all (whom it trained on is unknown), is refused before any metric."""
    from lungsynth.data.fingerprint import DataMismatch, PatientOverlap

    cfg, root, _ = setup
    leaky = tmp_path / "leaky"
    leaky.mkdir()
    (leaky / "final.pt").write_bytes(b"")
    stamp_generator(leaky, root, trained_on=("train",), extra_patients=("FAKE-009",))
    with pytest.raises(PatientOverlap, match=r"1 patient\(s\) of the test split.*FAKE-009"):
        evaluate_method(cfg, Trained(leaky, root, name="leaky"), n=2, real_root=root, out=tmp_path / "leaky_out")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "final.pt").write_bytes(b"")
    with pytest.raises(DataMismatch, match="records no training patients"):
        evaluate_method(cfg, Trained(bare, root, name="bare"), n=2, real_root=root, out=tmp_path / "bare_out")


def test_methods_of_one_unit_share_the_real_reference(setup, tmp_path, monkeypatch):
    """Two volume methods on the board read the real test and training sets once (not once each) and get the
    same real diversity."""
    import lungsynth.leaderboard as lb

    cfg, root, runs = setup
    twin = Trained(runs / "vol", root, name="fakevol2", noise_hu=30.0)
    monkeypatch.setitem(registry.METHODS, "fakevol2", twin)
    calls = []
    real_load = lb.load_real
    monkeypatch.setattr(lb, "load_real", lambda r, unit, split: calls.append((unit, split)) or real_load(r, unit, split))
    res = build_leaderboard(cfg, ["fakevol", "fakevol2"], real_root=root)
    assert sorted(calls) == [("volume", "test"), ("volume", "train")]
    assert res["fakevol"].row["ms_ssim_real"] == res["fakevol2"].row["ms_ssim_real"]
    assert res["fakevol"].reference is res["fakevol2"].reference
    assert res["fakevol"].row["reference"] == res["fakevol2"].row["reference"]


def test_every_row_names_a_reference_written_once(setup, tmp_path):
    """The reference folder lists the held-out cases and the network, holds the features the row was compared
    with, is not rewritten by a second method, and another feature network is another reference."""
    from lungsynth import paths
    from lungsynth.config import apply_overrides
    from lungsynth.leaderboard import load_real, write_reference

    cfg, root, runs = setup
    ev = build_leaderboard(cfg, ["fakevol"], real_root=root)["fakevol"]
    ref_id = ev.row["reference"]
    folder = paths.runs_dir(cfg.profile) / "reference" / "volume" / ref_id
    record = json.loads((folder / "reference.json").read_text())
    from lungsynth.eval.baselines import halves

    test = load_real(root, "volume", "test")
    a, r = halves(len(test["ids"]), cfg.seed)  # the reference is the held-out half R, the baselines' is A
    real = {"image": test["image"][r], "ids": [test["ids"][i] for i in r]}
    assert record["cases"] == real["ids"] and record["n"] == 3 and record["network"]["network"] == ev.row["network"]
    assert not set(record["cases"]) & set(json.loads(json.dumps(
        build_leaderboard(cfg, ["fakevol"], real_root=root)["baseline volume: real vs real"].details["items"])))
    f_real = unit_features(cfg, "volume", ev.reference)[0]
    np.testing.assert_allclose(np.load(folder / "features.npy"), f_real)
    stamp = (folder / "features.npy").stat().st_mtime_ns
    assert write_reference(cfg, root, "volume", real, f_real * 0, ev.row["network"]) == ref_id  # found, not recomputed
    assert (folder / "features.npy").stat().st_mtime_ns == stamp
    assert write_reference(cfg, root, "volume", real, f_real, "slicenet2d-random-s0") != ref_id
    other = apply_overrides(cfg, {"data.hu_max": 600.0})  # another window: another reference
    assert write_reference(other, root, "volume", real, f_real, ev.row["network"]) != ref_id
    assert f"| {ref_id} |" in write_leaderboard(
        {"fakevol": ev}, tmp_path, "smoke")["md"].read_text()


def test_baseline_rows_bracket_the_board(setup):
    """Real vs real is another half of one distribution: KID near 0 (3 against 3 volumes: too few for an interval,
    which the row says); the shuffled noise is far from the reference; every baseline is compared with the same
    reference half as the method."""
    from lungsynth.leaderboard import baseline_sets

    cfg, root, runs = setup
    res = build_leaderboard(cfg, ["fakevol"], real_root=root)
    floor, blur, noise = (res[f"baseline volume: {k}"].row for k in ("real vs real", "blurred real",
                                                                      "shuffled-pixel noise"))
    method = res["fakevol"].row
    assert {r["reference"] for r in (floor, blur, noise, method)} == {method["reference"]}
    assert floor["kid_ci"] == "insufficient N"
    assert noise["kid"] > floor["kid"] and noise["kid"] > 10 * abs(floor["kid"])
    assert floor["n_synthetic"] == 3 and floor["n_real"] == 3
    # the baseline sets are what their names say
    imgs = res["baseline volume: real vs real"].synthetic
    sets = baseline_sets(cfg, "volume", imgs)
    assert np.array_equal(sets["real vs real"], imgs)
    assert sets["blurred real"].std() < imgs.std()
    for a, b in zip(sets["shuffled-pixel noise"], imgs):
        np.testing.assert_allclose(np.sort(a.ravel()), np.sort(b.ravel()))  # same HU values, moved
        assert not np.array_equal(a, b)


def test_a_held_out_set_too_small_to_halve_has_no_baselines(tmp_path):
    from lungsynth.leaderboard import baseline_evaluations, real_reference

    root = make_fake_prepared(tmp_path / "real", n_train=4, n_test=3)
    cfg = get_config("smoke", {"evaluation.feature_network": "slicenet2d-2.5d", "evaluation.slice_net_steps": 5})
    ref = real_reference(cfg, root, "volume", (16, 16, 16))
    assert ref["comparison"] is None and len(ref["real"]["image"]) == 3
    assert baseline_evaluations(cfg, ref) == {}


def test_real_vs_real_fid_is_biased_at_small_n_and_kid_is_not():
    """Two samples of one Gaussian: FID at n = 5 is far above its value at n = 150 (biased), KID's mean stays
    near 0 at every n while its spread shrinks."""
    from lungsynth.leaderboard import real_vs_real_curve

    rng = np.random.default_rng(0)
    reference, comparison = rng.normal(size=(150, 8)), rng.normal(size=(150, 8))
    rows = {r["n"]: r for r in real_vs_real_curve(reference, comparison, [5, 20, 150, 400], repeats=10)}
    assert sorted(rows) == [5, 20, 150]  # 400 > the comparison set: skipped
    assert rows[5]["fid_mean"] > 3 * rows[150]["fid_mean"]
    assert all(abs(r["kid_mean"]) < 2 * r["kid_sd"] + 1e-3 for r in rows.values() if r["n"] < 150)
    assert rows[5]["kid_sd"] > rows[20]["kid_sd"]


def test_feature_map_puts_every_set_of_a_unit_in_one_picture(setup):
    from lungsynth.leaderboard import feature_map

    cfg, root, runs = setup
    res = build_leaderboard(cfg, ["fakevol"], real_root=root)
    xy = feature_map(res, "volume")
    assert list(xy) == ["reference", *(k for k, e in res.items() if e.row["unit"] == "volume")]
    assert all(v.shape == (len(res[k].synthetic) if k != "reference" else 3, 2) for k, v in xy.items())
    centre = xy["reference"].mean(0)
    dist = {k: float(np.linalg.norm(v.mean(0) - centre)) for k, v in xy.items()}
    assert dist["baseline volume: shuffled-pixel noise"] > dist["baseline volume: real vs real"]
    with pytest.raises(ValueError, match="no row of unit 'roi'"):
        feature_map(res, "roi")


def test_a_synthetic_set_of_another_unit_or_field_of_view_is_refused():
    from lungsynth.leaderboard import check_matches_reference

    real = {"shape": (16, 16, 16), "spacing_mm": [4.0, 4.0, 4.0]}
    syn = {"unit": "volume", "image": np.zeros((2, 32, 32, 32)),
           "records": [{"scan": {"spacing_mm": 2.0}}, {"scan": {"spacing_mm": 2.0}}]}
    check_matches_reference(syn, "volume", real, "runs/x/synthetic/m")  # 64 mm across both: comparable
    with pytest.raises(ValueError, match=r"32 voxels at 4 mm \(128 mm across\).*16 voxels at 4 mm \(64 mm\)"):
        check_matches_reference({**syn, "records": [{"scan": {"spacing_mm": 4.0}}]}, "volume", real, "d")
    with pytest.raises(ValueError, match="holds 'slice' items but .* is 'volume'"):
        check_matches_reference({**syn, "unit": "slice"}, "volume", real, "d")


def test_the_board_ranks_by_kid_within_a_unit_and_marks_fid_below_the_feature_dimension():
    from lungsynth.leaderboard import COLUMNS, leaderboard_markdown, ranked

    def row(name, unit, kid, n=8, dim=128):
        return {**dict.fromkeys(COLUMNS), "method": name, "unit": unit, "kid": kid, "fid": 1.0, "fid_ci": "",
                "kid_ci": "", "n_synthetic": n, "n_real": n, "network": "net", "feature_dim": dim}

    rows = [row("noise", "volume", 0.5), row("b", "slice", 0.02), row("a", "volume", 0.01),
            row("floor", "volume", -0.001), row("c", "volume", float("nan")), row("big", "slice", 0.01, n=200)]
    assert [r["method"] for r in ranked(rows)] == ["floor", "a", "noise", "c", "big", "b"]
    md = leaderboard_markdown(rows)
    assert "| a | volume | 8/8 | net | - | 1† " in md and "| big | slice | 200/200 | net | - | 1 " in md


def test_sample_counts_by_unit_and_the_papers_counts_in_full(tmp_path):
    from lungsynth.leaderboard import sample_count
    from lungsynth.methods.bbox_ldm.method import BboxLdmMethod
    from lungsynth.methods.hr_ldm.method import HrLdmMethod
    from lungsynth.methods.land.method import LandMethod
    from lungsynth.methods.lung_ddpm.method import LungDdpmMethod
    from lungsynth.methods.text2img.method import Text2ImgMethod

    faces = {"land": LandMethod(), "bbox_ldm": BboxLdmMethod(), "hr_ldm": HrLdmMethod(), "lung_ddpm": LungDdpmMethod(),
             "text2img": Text2ImgMethod()}  # the real faces (the module's fixture replaces the registry's)
    get_method = faces.__getitem__
    root = make_fake_prepared(tmp_path / "real", n_train=4, n_test=5, n_val=3)
    course = get_config("course")
    assert sample_count(course, get_method("land"), root) == course.evaluation.n_samples == 32
    assert sample_count(course, get_method("bbox_ldm"), root) == course.evaluation.n_samples_2d == 256
    full = get_config("full")
    assert [sample_count(full, get_method(m), root) for m in ("land", "bbox_ldm", "hr_ldm", "text2img")] == \
        [100, 2048, 500, 500]
    assert sample_count(full, get_method("lung_ddpm"), root) == 3  # one per case of the board's (validation) split


class Inpainter(Trained):
    """Pastes one ground-glass nodule (300 HU, label 2, flagged ``inpainted``) into each held-out scan, written at
    twice the prepared resolution (32^3 at 2 mm); the scan's own nodule stays as a real row (label 1)."""

    def spacing_mm(self, cfg):
        return 2.0

    def generate(self, cfg, model, conditions, seed):
        up = lambda a: a.repeat(2, 0).repeat(2, 1).repeat(2, 2)  # noqa: E731
        z, y, x = np.meshgrid(*(np.arange(32),) * 3, indexing="ij")
        new = (z - 26) ** 2 + (y - 26) ** 2 + (x - 6) ** 2 <= 9
        out = []
        for c in conditions:
            ct, label = up(np.asarray(c.arrays["ct"], np.float32)), up(np.asarray(c.arrays["label"])).astype(np.uint8)
            ct[new], label[new] = 300.0, 2
            rows = [{"label_value": 1, "subtype_id": 0, "subtype": "solid", "texture": 5},
                    {"label_value": 2, "subtype_id": 2, "subtype": "ground-glass", "texture": 1, "inpainted": True}]
            arrays = {k: up(np.asarray(v)) for k, v in c.arrays.items()}  # every condition array on the new grid
            out.append({"arrays": {**arrays, "ct": ct, "label": label}, "nodules": rows})
        return out


def test_a_method_that_makes_nodules_is_also_compared_on_crops_of_its_generated_nodules(setup, monkeypatch):
    """The nodule-crop row holds one crop per *generated* nodule (the scan's real nodule is not a synthetic item),
    centred on it, and the real crops are cut from the held-out volumes brought to the synthetic grid (2 mm, not
    their prepared 4 mm), around the real nodules of the reference half; its baselines come from the other half."""
    cfg, root, runs = setup
    monkeypatch.setitem(registry.METHODS, "fakeinp", Inpainter(runs / "vol", root, name="fakeinp"))
    res = build_leaderboard(cfg, ["fakeinp"], real_root=root)
    assert list(res)[:2] == ["fakeinp", "fakeinp (nodule crops)"]
    crops = res["fakeinp (nodule crops)"]
    size = cfg.data.crop_size
    assert crops.row["unit"] == "nodule" and crops.row["method"] == "fakeinp"
    assert crops.row["n_synthetic"] == 6 and crops.synthetic.shape == (6, size, size, size)  # not 12: real rows out
    centre = crops.synthetic[:, size // 2 - 1:size // 2 + 1, size // 2 - 1:size // 2 + 1, size // 2 - 1:size // 2 + 1]
    np.testing.assert_allclose(centre, 300.0, atol=1e-3)  # each crop sits on the pasted nodule
    assert crops.details["real_spacing_mm"] == pytest.approx(2.0) == crops.details["synthetic_spacing_mm"]
    assert crops.row["n_real"] == 3 and np.abs(crops.reference[:, size // 2, size // 2, size // 2]).max() < 200
    assert crops.row["reference"].startswith("nodule-") and crops.row["jsd_ground-glass"] is None
    floor = res["baseline nodule: real vs real"].row
    assert floor["reference"] == crops.row["reference"] and floor["n_synthetic"] == 3
    assert res["fakeinp"].row["unit"] == "volume" and res["fakeinp"].row["n_synthetic"] == 6


def test_the_autoencoder_a_latent_method_decodes_through_gives_a_ceiling_row(setup, monkeypatch, capsys):
    """A method that names a chapter 02 autoencoder puts that autoencoder's reconstructions of the comparison half on
    the board, compared with the reference half like the other baselines; with no finished autoencoder there is no
    row, and the board says why."""
    import torch

    import lungsynth.autoencoders as autoencoders

    class Blurry(torch.nn.Module):  # an x2 'autoencoder': average-pool, then nearest upsampling
        kind = "vae3d"

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def reconstruct(self, x, roi_size=None):
            return torch.nn.functional.interpolate(torch.nn.functional.avg_pool3d(x, 2), scale_factor=2.0)

    cfg, root, runs = setup
    latent = Trained(runs / "vol", root, name="fakelatent", noise_hu=30.0)
    latent.autoencoder = "vae3d"
    monkeypatch.setitem(registry.METHODS, "fakelatent", latent)
    monkeypatch.setattr(autoencoders, "trained_autoencoder", lambda kind, cfg, **kw: Blurry())
    res = build_leaderboard(cfg, ["fakelatent"], real_root=root)
    key = "baseline volume: vae3d reconstructions (autoencoder ceiling)"
    ceiling, floor = res[key], res["baseline volume: real vs real"]
    lo, hi = cfg.data.hu_min, cfg.data.hu_max
    unit = torch.from_numpy(np.clip((floor.synthetic - lo) / (hi - lo), 0, 1).astype(np.float32))[:, None]
    want = Blurry().reconstruct(unit)[:, 0].numpy() * (hi - lo) + lo  # the comparison half, reconstructed
    np.testing.assert_allclose(ceiling.synthetic, want, atol=1e-3)
    assert ceiling.row["reference"] == res["fakelatent"].row["reference"] and ceiling.row["n_synthetic"] == 3
    assert [k for k in res if "ceiling" in k] == [key]  # the method's own unit only, not its nodule crops
    monkeypatch.setattr(autoencoders, "trained_autoencoder", lambda kind, cfg, **kw: None)
    res = build_leaderboard(cfg, ["fakelatent"], real_root=root)
    assert key not in res and "no autoencoder ceiling row for vae3d" in capsys.readouterr().out


def test_each_face_names_the_autoencoder_it_decodes_through(tmp_path):
    from lungsynth.config import apply_overrides
    from lungsynth.methods.bbox_ldm.method import BboxLdmMethod
    from lungsynth.methods.hr_ldm.method import HrLdmMethod
    from lungsynth.methods.land.method import LandMethod
    from lungsynth.methods.lung_ddpm.method import LungDdpmMethod
    from lungsynth.methods.text2img.method import Text2ImgMethod

    cfg = get_config("smoke")
    kinds = [f.autoencoder_kind(cfg) for f in (LandMethod(), HrLdmMethod(), BboxLdmMethod(), Text2ImgMethod(),
                                               LungDdpmMethod())]
    assert kinds == ["vae3d", "vae3d", "vqvae2d", "vae2d", None]  # Lung-DDPM diffuses pixels
    assert BboxLdmMethod().autoencoder_kind(apply_overrides(cfg, {"bbox_ldm.pretrained_vq": str(tmp_path)})) is None
