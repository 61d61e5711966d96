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
