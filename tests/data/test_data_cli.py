import pandas as pd

from lungsynth.cli import main


def test_data_cli_prepare_and_errors(phantom_root, tmp_path, capsys):
    assert main(["data", "prepare", "--dicom-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    out = tmp_path / "p"
    args = ["data", "prepare", "--dicom-root", str(phantom_root), "--out", str(out), "--scans", "s698",
            "--set", "data.size_3d=32", "--set", "data.spacing_3d_mm=8"]
    assert main(args) == 0
    scans = pd.read_csv(out / "scans.csv")
    assert scans.scan_id.tolist() == ["LIDC-IDRI-0957_s698"] and scans["shape"].iloc[0] == "32,32,32"
