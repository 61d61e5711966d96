"""Chapter 05 — HR-LDM, the train room: training with and without the regulariser, then inpainting."""

from __future__ import annotations

import numpy as np
import pytest

from lungsynth.methods import hr_ldm


def test_train_with_and_without_regulariser_then_inpaint(cfg, vae, runs, crops, volume):
    from lungsynth.engine import read_metrics

    hist_run, nohist_run = runs
    m_hist, m_no = read_metrics(hist_run / "metrics.csv"), read_metrics(nohist_run / "metrics.csv")
    assert "loss_hist" in m_hist and "loss_hist" not in m_no
    assert len(m_hist["step"]) == 3 and np.isfinite(m_hist["loss"]).all()
    assert m_hist["lr"][-1] < m_hist["lr"][0]  # polynomial decay
    assert hr_ldm.ensure_trained(cfg, True, run_dir=hist_run) == hist_run  # final.pt exists: no retraining
    model = hr_ldm.load(cfg, nohist_run, hist_loss=False, vae=vae, device="cpu")
    assert model.hist_loss is False
    library = hr_ldm.NoduleLibrary.from_crops(crops, cfg)
    ct, lung = volume
    res = hr_ldm.inpaint_volume(model, ct, lung, 2, spacing_mm=1.0, library=library, seed=3)
    assert res.ct_hu.shape == ct.shape and res.subtype == 2
    assert np.array_equal(res.ct_hu[res.region == 0], ct[res.region == 0])  # nothing changes outside
    assert res.nodule_mask.any() and lung[res.nodule_mask > 0].all()
    assert res.generated_histogram.sum() == pytest.approx(1.0)
    assert np.isfinite(res.delta_hu_outside)
    with pytest.raises(ValueError, match="subtype"):
        hr_ldm.inpaint_volume(model, ct, lung, 5, spacing_mm=1.0, library=library)
    with pytest.raises(ValueError, match="sums to"):
        hr_ldm.inpaint_volume(model, ct, lung, 0, spacing_mm=1.0, library=library, histogram=np.ones(40))
    outside = tuple(int(v) for v in np.argwhere(~lung)[0])
    with pytest.raises(ValueError, match="outside the lung"):
        hr_ldm.inpaint_volume(model, ct, lung, 0, spacing_mm=1.0, library=library, centre=outside)
