from pathlib import Path

from lungsynth import paths


def test_home_override(monkeypatch, tmp_path):
    monkeypatch.setenv("LUNGSYNTH_HOME", str(tmp_path))
    assert paths.home() == tmp_path.resolve()
    assert paths.prepared_dir("smoke") == tmp_path.resolve() / "data" / "generated" / "smoke" / "prepared"
    run = paths.run_dir("course", "02_vae3d")
    assert run.is_dir() and run == tmp_path.resolve() / "runs" / "course" / "02_vae3d"


def test_repository_folders():
    assert (paths.notebooks_dir() / "00_welcome.ipynb").is_file()
    assert paths.shipped_data_dir() == Path(paths.REPO_DIR) / "data"


def test_variant_name_appends_the_changed_settings_and_hashes_long_ones():
    assert paths.variant_name("prepared", {}) == "prepared"
    assert paths.variant_name("05_hr_ldm_hist", {"hr_ldm.train_steps": 400, "seed": 1}) == \
        "05_hr_ldm_hist@train_steps=400+seed=1"  # sorted by the dotted key
    assert paths.variant_name("x", {"a.window": (-1000, 400)}) == "x@window=-1000,400"
    long = {f"s.key_{i}": i for i in range(12)}
    name = paths.variant_name("run", long)
    assert len(name) <= 4 + 40 + 11 and name != paths.variant_name("run", {**long, "s.key_0": 99})
