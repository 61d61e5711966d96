"""Chapter 05 — HR-LDM, the train room: training with and without the regulariser, then inpainting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lungsynth.methods import hr_ldm


def test_train_with_and_without_regulariser_then_inpaint(cfg, vae, runs, crops, volume, monkeypatch):
    from lungsynth.engine import read_metrics

    hist_run, nohist_run = runs
    m_hist, m_no = read_metrics(hist_run / "metrics.csv"), read_metrics(nohist_run / "metrics.csv")
    assert "loss_hist" in m_hist and "loss_hist" not in m_no
    assert len(m_hist["step"]) == 3 and np.isfinite(m_hist["loss"]).all()
    assert m_hist["lr"][-1] < m_hist["lr"][0]  # polynomial decay
    before = (hist_run / "final.pt").stat().st_mtime_ns
    assert hr_ldm.ensure_trained(cfg, True, run_dir=hist_run, crops=crops) == hist_run  # trained: no retraining
    assert (hist_run / "final.pt").stat().st_mtime_ns == before
    model = hr_ldm.load(cfg, nohist_run, hist_loss=False, vae=vae, device="cpu")
    assert model.hist_loss is False
    library = hr_ldm.NoduleLibrary.from_crops(crops, cfg)
    ct, lung = volume
    res = hr_ldm.inpaint_volume(model, ct, lung, 2, spacing_mm=1.0, library=library, seed=3, intermediates_every=1)
    assert res.ct_hu.shape == ct.shape and res.subtype == 2
    # the row reports the real nodule's recorded diameter (as real rows do), not its mask's extent: this 7 mm
    # ball's mask spans 6 voxels (a 6 mm LIDC nodule's can span 5, which a 6-30 mm filter would drop)
    (shape,) = np.flatnonzero(library.subtypes == 2)
    assert res.diameter_mm == library.diameters_mm[shape] == 7.0
    assert res.extent_mm == max(library.masks[shape].shape[1:]) * model.crop_spacing_mm == 6.0
    assert np.array_equal(res.ct_hu[res.region == 0], ct[res.region == 0])  # the paste: only the region changes
    assert not np.array_equal(res.ct_hu[res.region > 0], ct[res.region > 0])
    assert res.nodule_mask.any() and lung[res.nodule_mask > 0].all()
    assert res.generated_histogram.sum() == pytest.approx(1.0)
    nod = res.crop_mask > 0  # delta_hu_outside by hand: mean |decoded - input| outside the nodule, in the crop
    assert res.delta_hu_outside == pytest.approx(float(np.abs(res.crop_after - res.crop_before)[~nod].mean()),
                                                 rel=1e-5)
    assert res.delta_hu_outside > 0  # the VAE does not reconstruct exactly: the paste above hides that
    # What the paste hides, the loop's own states (eq. 10): outside M, z_t is z_bg = E(crop before) at every
    # step (this config re-anchors to the clean background; both anchors: test_sample.py).
    from lungsynth.methods.hr_ldm.model import hu_to_unit

    assert cfg.hr_ldm.anchor_noise_background is False
    z_bg = model.vae.encode_latent(hu_to_unit(torch.from_numpy(res.crop_before)[None, None], cfg), sample=False)
    m = (hr_ldm.mask_to_latent(torch.from_numpy(res.crop_mask)[None, None], model.vae.downsample) > 0).expand_as(z_bg)
    inter = res.intermediates
    assert len(inter) == cfg.hr_ldm.ddim_steps and inter[-1]["timestep"] == -1
    for it in inter:
        assert torch.allclose(it["sample"][~m], z_bg[~m], atol=1e-4), it["timestep"]
    assert not torch.allclose(inter[-1]["sample"][m], z_bg[m], atol=1e-2)  # generated inside M
    with pytest.raises(ValueError, match="subtype"):
        hr_ldm.inpaint_volume(model, ct, lung, 5, spacing_mm=1.0, library=library)
    with pytest.raises(ValueError, match="sums to"):
        hr_ldm.inpaint_volume(model, ct, lung, 0, spacing_mm=1.0, library=library, histogram=np.ones(40))
    outside = tuple(int(v) for v in np.argwhere(~lung)[0])
    with pytest.raises(ValueError, match="outside the lung"):
        hr_ldm.inpaint_volume(model, ct, lung, 0, spacing_mm=1.0, library=library, centre=outside)
    # a drawn centre whose placed mask leaves the lung is drawn again; a centre the caller gave is not
    import importlib

    room = importlib.import_module("lungsynth.methods.hr_ldm.sample")
    real_check, calls = room.validate_mask_in_lung, []

    def fails_twice(mask, lung_, **kw):
        calls.append(1)
        if len(calls) <= 2:
            raise ValueError("nodule mask at the chosen centre lies 30.1% outside the lung")
        return real_check(mask, lung_, **kw)

    monkeypatch.setattr(room, "validate_mask_in_lung", fails_twice)
    res = hr_ldm.inpaint_volume(model, ct, lung, 0, spacing_mm=1.0, library=library, seed=3)
    assert len(calls) == 3 and lung[res.nodule_mask > 0].all()
    calls.clear()
    with pytest.raises(ValueError, match="outside the lung"):
        hr_ldm.inpaint_volume(model, ct, lung, 0, spacing_mm=1.0, library=library, centre=res.centre)
    assert len(calls) == 1


def test_one_config_trains_to_the_same_weights(cfg, vae, crops, tmp_path):
    """The HR-LDM network's initial weights come from cfg.seed: two trainings of one config end bit-identical."""
    first = hr_ldm.train(cfg, True, tmp_path / "a", vae=vae, crops=crops, progress=False)
    torch.rand(1000)  # whatever ran before must not matter
    second = hr_ldm.train(cfg, True, tmp_path / "b", vae=vae, crops=crops, progress=False)
    a, b = (torch.load(r / "final.pt", map_location="cpu", weights_only=True)["modules"] for r in (first, second))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[m][k], b[m][k]) for m in a for k in a[m])


def test_the_configured_nodule_weight_reaches_training(cfg, vae, crops, tmp_path):
    """hr_ldm.nodule_weight trains through to the weights: eq. 5 as printed (1) and weighted (20) end apart."""
    from lungsynth.config import apply_overrides

    runs = {w: hr_ldm.train(apply_overrides(cfg, {"hr_ldm.nodule_weight": w}), False, tmp_path / str(w), vae=vae,
                            crops=crops, progress=False) for w in (1.0, 20.0)}
    a, b = (torch.load(r / "final.pt", map_location="cpu", weights_only=True)["modules"] for r in runs.values())
    assert any(not torch.equal(a[m][k], b[m][k]) for m in a for k in a[m])


def test_face_never_overwrites_a_nodule_and_prefers_the_healthy_twin(cfg, cfg_1mm, vae, runs, crops, volume):
    """Real-LIDC path: the scan's nodule keeps its label and voxels, the new one gets the next label beside it.
    Phantom path: the healthy twin is the background and the label map holds only the new nodule."""
    from lungsynth.data.conditions import Condition
    from lungsynth.methods.hr_ldm.method import HrLdmMethod

    ct, lung = volume
    ct = ct.copy()
    label = np.zeros(ct.shape, np.uint8)
    label[10:38, 14:34, 8:21] = 1  # a large existing nodule filling the left lung's core
    ct[label > 0] = 30.0
    hrmask = np.zeros(ct.shape + (3,), np.uint8)
    hrmask[..., 0] = label
    row = {"label_value": 1, "texture": 5, "subtype": "solid", "subtype_id": 0, "diameter_mm": 9.0}
    tight = cfg_1mm
    model = hr_ldm.load(tight, runs[0], vae=vae, device="cpu")
    face = HrLdmMethod()
    face._library = hr_ldm.NoduleLibrary.from_crops(crops, cfg)
    conds = [Condition(k, "heldout", "volume", arrays={"ct": ct, "lung": lung, "label": label, "hrmask": hrmask,
                                                       "cond": np.zeros(ct.shape, np.float32)}, nodules=[row])
             for k in range(4)]
    out = face.generate(tight, model, conds, seed=0)
    assert sum(o["info"]["subpleural"] for o in out) == 2  # half of four, as requested
    for o in out:
        lab = o["arrays"]["label"]
        assert (lab[label > 0] == 1).all() and np.array_equal(o["arrays"]["ct"][label > 0], ct[label > 0])
        assert (lab == 2).any() and lung[lab == 2].all()
        assert [r["label_value"] for r in o["nodules"]] == [1, 2]
    healthy = np.where(lung, -850.0, 40.0).astype(np.float32)
    conds[0].arrays["healthy"] = healthy
    twin = face.generate(tight, model, conds[:1], seed=1)[0]
    assert set(np.unique(twin["arrays"]["label"])) == {0, 1} and len(twin["nodules"]) == 1
    changed = twin["arrays"]["ct"] != healthy
    assert changed.any() and (twin["arrays"]["label"][changed] <= 1).all()
    assert twin["info"]["background"] == "healthy twin"


def test_a_checkpoint_samples_with_the_prediction_it_was_trained_on(cfg, vae, crops, tmp_path):
    """A v-trained run loaded under a config that says epsilon still samples with v (the spec decides)."""
    from lungsynth.config import apply_overrides

    run = hr_ldm.train(apply_overrides(cfg, {"hr_ldm.prediction": "v_prediction"}), False, tmp_path / "v", vae=vae,
                       crops=crops, progress=False)
    eps_cfg = apply_overrides(cfg, {"hr_ldm.prediction": "epsilon"})
    assert hr_ldm.load(eps_cfg, run, False, vae=vae).scheduler.prediction_type == "v_prediction"


def test_twin_context_keeps_the_lesion_latents_and_takes_the_background_from_the_twin(cfg, vae, crops):
    """train_context="twin": inside M the cached z0 is the scan's latent, outside it the healthy twin's (an item
    without a twin keeps its own); "scan" keeps the scan's latents everywhere; an unknown value is an error."""
    from lungsynth.config import apply_overrides

    trunc = hr_ldm.TruncatedDecoder(vae)
    twins = []
    for i, c in enumerate(crops):
        healthy = torch.where(c["mask"] > 0, torch.full_like(c["ct"], 0.1), c["ct"])  # the nodule painted lung
        twins.append({**c, "healthy": healthy} if i != 1 else dict(c))
    scan = hr_ldm.build_latent_cache(apply_overrides(cfg, {"hr_ldm.train_context": "scan"}), twins, vae, trunc)
    twin = hr_ldm.build_latent_cache(apply_overrides(cfg, {"hr_ldm.train_context": "twin"}), twins, vae, trunc)
    assert scan.twin_share() == 0.0 and twin.twin_share() == pytest.approx(5 / 6)
    with torch.no_grad():
        z_healthy = vae.encode_latent(twins[0]["healthy"][None], sample=False)[0]
    a, b = scan[0], twin[0]
    inside = a["mask"].bool().expand_as(a["z0"])
    assert torch.equal(a["z0"][inside], b["z0"][inside])
    assert torch.allclose(b["z0"][~inside], z_healthy[~inside], atol=1e-5)
    assert not torch.allclose(a["z0"][~inside], b["z0"][~inside], atol=1e-4)
    assert torch.equal(scan[1]["z0"], twin[1]["z0"])  # no twin: its own latents
    with pytest.raises(ValueError, match="train_context"):
        hr_ldm.build_latent_cache(_bad_context(cfg), twins, vae, trunc)


def _bad_context(cfg):
    import copy

    bad = copy.deepcopy(cfg)
    bad.hr_ldm.train_context = "nearby"
    return bad
