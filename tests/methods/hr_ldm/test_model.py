"""Chapter 05 — HR-LDM, the model room: histograms, condition checks, the loss and the schedulers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lungsynth.methods import hr_ldm


# --------------------------------------------------------------------------- histograms


def test_soft_histogram_sums_to_one_and_has_gradient():
    torch.manual_seed(0)
    x = torch.rand(2, 500, requires_grad=True)
    w = (torch.rand(2, 500) > 0.3).float()
    h = hr_ldm.soft_histogram(x, w, bins=40)
    assert h.shape == (2, 40)
    assert torch.allclose(h.sum(dim=1), torch.ones(2), atol=1e-6)
    (h * torch.arange(40.0)).sum().backward()  # mean bin index: moves when values move
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert x.grad[w == 0].abs().max() == 0  # voxels outside the lesion do not count


def test_soft_histogram_matches_hard_binning_at_centres():
    centres = torch.tensor(hr_ldm.bin_centres(10, (0.0, 1.0)))
    h = hr_ldm.soft_histogram(centres[[0, 0, 3, 9]], bins=10)
    assert h[0] == pytest.approx(0.5, abs=1e-6) and h[3] == pytest.approx(0.25, abs=1e-6)


def test_jsd_zero_for_equal_positive_for_different():
    p = torch.softmax(torch.randn(3, 40, generator=torch.Generator().manual_seed(0)), dim=1)
    q = torch.softmax(torch.randn(3, 40, generator=torch.Generator().manual_seed(1)), dim=1)
    assert torch.allclose(hr_ldm.js_divergence(p, p), torch.zeros(3), atol=1e-6)
    d = hr_ldm.js_divergence(p, q)
    assert (d > 1e-3).all() and (d <= math.log(2) + 1e-6).all()
    one_hot_a, one_hot_b = torch.eye(40)[0], torch.eye(40)[5]
    assert float(hr_ldm.js_divergence(one_hot_a, one_hot_b)) == pytest.approx(math.log(2), abs=1e-4)
    # reported JSDs are in bits, the unit of the board's (lungsynth.eval.fidelity.jensen_shannon)
    from lungsynth.eval.fidelity import jensen_shannon

    assert hr_ldm.js_divergence_np(one_hot_a.numpy(), one_hot_b.numpy()) == pytest.approx(1.0, abs=1e-4)
    assert hr_ldm.js_divergence_np(p[0].numpy(), q[0].numpy()) == pytest.approx(
        jensen_shannon(p[0].numpy(), q[0].numpy()), rel=1e-5)


def test_hu_histogram_is_normalised_and_clips():
    hu = np.array([-2000.0, -1000.0, 0.0, 399.0, 5000.0])
    h = hr_ldm.hu_histogram(hu)
    assert h.shape == (40,) and h.sum() == pytest.approx(1.0)
    assert h[0] == pytest.approx(0.4) and h[-1] == pytest.approx(0.4)


# --------------------------------------------------------------------------- bad input


def test_bad_subtype_histogram_and_mask_are_errors():
    with pytest.raises(ValueError, match="subtype 3 is not valid"):
        hr_ldm.validate_subtype(3)
    with pytest.raises(ValueError, match="subtype"):
        hr_ldm.validate_subtype(-1)
    with pytest.raises(ValueError, match="40 bins"):
        hr_ldm.validate_histogram(np.full(32, 1 / 32))
    with pytest.raises(ValueError, match="sums to"):
        hr_ldm.validate_histogram(np.full(40, 0.1))
    with pytest.raises(ValueError, match="negative"):
        hr_ldm.validate_histogram(np.r_[-0.5, 1.5, np.zeros(38)])
    lung = np.zeros((8, 8, 8), bool)
    lung[2:6, 2:6, 2:6] = True
    mask = np.zeros_like(lung)
    mask[0:3, 3, 3] = True
    with pytest.raises(ValueError, match="outside the lung"):
        hr_ldm.validate_mask_in_lung(mask, lung)
    hr_ldm.validate_mask_in_lung(mask & lung, lung)


# --------------------------------------------------------------------------- the loss and the schedulers


def test_histogram_term_reaches_the_denoiser(cfg, vae, crops):
    trunc = hr_ldm.TruncatedDecoder(vae)
    cache = hr_ldm.build_latent_cache(cfg, crops, vae, trunc)
    assert len(cache) == 6 and cache.subtype_counts() == [2, 2, 2]
    assert cache[0]["hist"].sum() == pytest.approx(1.0, abs=1e-5)
    torch.manual_seed(0)
    net = hr_ldm.HrLdmNet(hr_ldm.net_spec(cfg, vae.latent_channels))
    sched, _ = hr_ldm.make_schedulers(cfg)
    batch = torch.utils.data.default_collate([cache[0], cache[1]])
    t = torch.tensor([10, 500])
    out = hr_ldm.hr_ldm_losses(net, sched, batch, trunc, hist_weight=10.0, timesteps=t)
    assert out["loss_hist"] > 0
    out["loss_hist"].backward()
    grads = [p.grad.abs().sum() for p in net.unet.parameters() if p.grad is not None]
    assert grads and sum(grads) > 0
    assert all(p.grad is None for p in trunc.parameters())  # the decoder copy stays frozen
    base = hr_ldm.hr_ldm_losses(net, sched, batch, None, hist_weight=10.0, timesteps=t)
    assert "loss_hist" not in base and torch.equal(base["loss"], base["loss_eps"])


def test_alpha_bar_weighting_scales_the_histogram_term(cfg, vae, crops):
    """hist_timestep_weighting="alpha_bar": the histogram term of each sample is multiplied by
    alpha_bar_t (tiny at large t), the logged loss_hist stays the unweighted JSD; unknown modes fail."""
    from lungsynth.config import apply_overrides

    cfg = apply_overrides(cfg, {"hr_ldm.prediction": "epsilon"})  # eq. 6 as printed
    trunc = hr_ldm.TruncatedDecoder(vae)
    cache = hr_ldm.build_latent_cache(cfg, crops, vae, trunc)
    torch.manual_seed(0)
    net = hr_ldm.HrLdmNet(hr_ldm.net_spec(cfg, vae.latent_channels))
    sched, _ = hr_ldm.make_schedulers(cfg)
    batch = torch.utils.data.default_collate([cache[0], cache[1]])
    t, noise = torch.tensor([999, 999]), torch.randn_like(batch["z0"])
    plain = hr_ldm.hr_ldm_losses(net, sched, batch, trunc, 10.0, timesteps=t, noise=noise)
    weighted = hr_ldm.hr_ldm_losses(net, sched, batch, trunc, 10.0, timesteps=t, noise=noise,
                                    hist_timestep_weighting="alpha_bar")
    ab = float(sched.alphas_cumprod[999])
    assert torch.allclose(plain["loss_hist"], weighted["loss_hist"])
    term_plain = (plain["loss"] - plain["loss_eps"]).detach()
    term_weighted = (weighted["loss"] - weighted["loss_eps"]).detach()
    assert float(term_plain) > 0 and float(term_weighted) == pytest.approx(ab * float(term_plain), rel=1e-4)
    with pytest.raises(ValueError, match="hist_timestep_weighting"):
        hr_ldm.hr_ldm_losses(net, sched, batch, trunc, 10.0, timesteps=t, hist_timestep_weighting="snr")


def test_sampling_scheduler_clips_z0_when_asked(cfg):
    from lungsynth.config import apply_overrides

    _, sample = hr_ldm.make_schedulers(cfg)
    assert cfg.hr_ldm.clip_latent == 3.0 and sample.clip_sample and tuple(sample.clip_sample_values) == (-3.0, 3.0)
    _, off = hr_ldm.make_schedulers(apply_overrides(cfg, {"hr_ldm.clip_latent": 0.0}))
    assert not off.clip_sample


# --------------------------------------------------------------------------- the paper's equations by hand


def test_truncated_decoder_is_the_real_decode_up_to_its_penultimate_residual_block(vae):
    """post_quant_conv included, cut after the decoder's penultimate residual block: compared with that block's
    output inside the real AutoencoderKL.decode (forward hook); fails if either is dropped or the cut moves."""
    trunc = hr_ldm.TruncatedDecoder(vae)
    blocks = list(vae.net.decoder.blocks)
    res = [i for i, b in enumerate(blocks) if "ResBlock" in type(b).__name__]
    seen = {}
    hook = blocks[res[-2]].register_forward_hook(lambda mod, args, out: seen.setdefault("x", out.detach()))
    z = torch.randn(2, vae.latent_channels, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        vae.net.decode(z)
    hook.remove()
    feats = trunc(z)
    assert trunc.cut == res[-2]
    assert feats.shape == seen["x"].shape and feats.shape[2:] == (8, 8, 8)  # before the last upsampling: x2
    assert trunc.upsamplings == 2
    assert torch.allclose(feats, seen["x"], atol=1e-5)
    assert not torch.allclose(trunc.blocks(z), seen["x"], atol=1e-3)  # without post_quant_conv it differs


def test_eq5_inpaint_loss_by_hand():
    """Eq. 5 per sample: the L1 norm over channels summed over lesion voxels / (lesion voxels + delta)."""
    eps = torch.zeros(2, 2, 1, 1, 3)
    eps_hat = torch.tensor([[[[[1.0, 2.0, 3.0]]], [[[1.0, 0.0, -1.0]]]],
                            [[[[0.5, 0.5, 0.5]]], [[[0.5, 0.5, 0.5]]]]])
    mask = torch.tensor([[[[[1.0, 1.0, 0.0]]]], [[[[0.0, 0.0, 1.0]]]]])
    # sample 0: voxels 0, 1 -> (|1| + |1|) + (|2| + |0|) = 4 over 2 voxels = 2; sample 1: voxel 2 -> 1 over 1 = 1
    assert float(hr_ldm.inpaint_l1(eps_hat, eps, mask, delta=0.0)) == pytest.approx(1.5)
    assert float(hr_ldm.inpaint_l1(eps_hat, eps, mask)) == pytest.approx((4 / (2 + 1e-6) + 1 / (1 + 1e-6)) / 2)
    with pytest.raises(ValueError, match="one-channel mask"):
        hr_ldm.inpaint_l1(eps_hat, eps, mask.expand(2, 2, 1, 1, 3))
    # weighted (hr_ldm.nodule_weight): sample 0's voxels cost 4 and 2; voxel 0 counting 3x -> (3 x 4 + 2) / 4,
    # unweighted (4 + 2) / 2; a weight on sample 1's only lesion voxel cancels in its own mean
    eps_hat2 = eps_hat.clone()
    eps_hat2[0, :, 0, 0, 0] = torch.tensor([4.0, 0.0])
    skew = torch.tensor([[[[[3.0, 1.0, 1.0]]]], [[[[1.0, 1.0, 4.0]]]]])
    assert float(hr_ldm.inpaint_l1(eps_hat2, eps, mask, delta=0.0, weight=skew)) == pytest.approx(((3 * 4 + 2) / 4 + 1) / 2)
    assert float(hr_ldm.inpaint_l1(eps_hat2, eps, mask, delta=0.0)) == pytest.approx(((4 + 2) / 2 + 1) / 2)


def test_eq7_eq8_soft_histogram_and_jsd_by_hand():
    """Eq. 7 with K = 4 bins on [0, 1] (width 0.25, centres .125 .375 .625 .875) and eq. 8 in natural log."""
    x = torch.tensor([0.125, 0.25, 0.8])
    # 0.125 -> bin 0; 0.25 halfway between bins 0 and 1; 0.8 -> 0.3 of bin 2, 0.7 of bin 3
    want = torch.tensor([1.5, 0.5, 0.3, 0.7]) / 3
    assert torch.allclose(hr_ldm.soft_histogram(x, bins=4, eps=0.0), want, atol=1e-6)
    p, q = torch.tensor([0.5, 0.5, 0.0, 0.0]), torch.tensor([0.0, 0.5, 0.5, 0.0])
    # a = (.25, .5, .25, 0): KL(p||a) = .5 ln 2, KL(q||a) = .5 ln 2, JSD = .5 ln 2
    assert float(hr_ldm.js_divergence(p, q, eps=1e-12)) == pytest.approx(0.5 * math.log(2), abs=1e-6)


def test_histogram_mlp_has_the_one_hidden_layer_of_eq3():
    enc = hr_ldm.HistogramEncoder(bins=40, hidden=8, context_dim=6)
    linears = [m for m in enc.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(40, 8), (8, 6)]
    assert len(hr_ldm.HistogramEncoder(40, 8, 6, hidden_layers=2).mlp) == 5  # the named option
    with pytest.raises(ValueError, match="at least one hidden layer"):
        hr_ldm.HistogramEncoder(40, 8, 6, hidden_layers=0)


def test_v_prediction_regresses_v_and_reads_z0_from_it(cfg, vae, crops):
    """hr_ldm.prediction = v_prediction: eq. 5's masked L1 compares the output with v (not eps), and the
    histogram term decodes the z0 that v implies; the net spec records what it regresses."""
    from lungsynth.config import apply_overrides
    from lungsynth.diffusion.objectives import add_noise_masked, v_target

    vcfg = apply_overrides(cfg, {"hr_ldm.prediction": "v"})
    assert hr_ldm.net_spec(vcfg, vae.latent_channels)["prediction"] == "v_prediction"
    ecfg = apply_overrides(cfg, {"hr_ldm.prediction": "epsilon"})
    assert hr_ldm.net_spec(ecfg, vae.latent_channels)["prediction"] == "epsilon"
    trunc = hr_ldm.TruncatedDecoder(vae)
    cache = hr_ldm.build_latent_cache(cfg, crops, vae, trunc)
    batch = torch.utils.data.default_collate([cache[0], cache[1]])
    torch.manual_seed(0)
    net = hr_ldm.HrLdmNet(hr_ldm.net_spec(vcfg, vae.latent_channels))
    sched, sample_sched = hr_ldm.make_schedulers(vcfg)
    assert sched.prediction_type == sample_sched.prediction_type == "v_prediction"
    t, noise = torch.tensor([100, 700]), torch.randn_like(batch["z0"])
    out = hr_ldm.hr_ldm_losses(net, sched, batch, None, 0.0, timesteps=t, noise=noise)
    with torch.no_grad():
        zt = add_noise_masked(sched, batch["z0"], noise, t, batch["mask"])
        pred = net(torch.cat([zt, batch["cond"]], dim=1), t, batch["hist"], batch["subtype"])
        ab = sched.alphas_cumprod[t].reshape(2, 1, 1, 1, 1)
        want_v = hr_ldm.inpaint_l1(pred, v_target(batch["z0"], noise, ab), batch["mask"])
        want_eps = hr_ldm.inpaint_l1(pred, noise, batch["mask"])
    assert float(out["loss_eps"]) == pytest.approx(float(want_v), rel=1e-5)
    assert abs(float(out["loss_eps"]) - float(want_eps)) > 1e-3


def test_nodule_weight_reaches_eq5_through_the_cached_nodule_share(cfg, vae, crops):
    """The cache holds each latent voxel's nodule share (in [0, 1], 1 somewhere inside the nodule, 0 far off);
    nodule_weight = 1 is eq. 5 as printed, another weight changes the loss."""
    trunc = hr_ldm.TruncatedDecoder(vae)
    cache = hr_ldm.build_latent_cache(cfg, crops, vae, trunc)
    share = cache[0]["nodule_share"]
    assert share.shape == cache[0]["mask"].shape and float(share.min()) == 0.0 and 0.0 < float(share.max()) <= 1.0
    assert bool(((share > 0) <= (cache[0]["mask"] > 0)).all())  # a share only where M is
    torch.manual_seed(0)
    net = hr_ldm.HrLdmNet(hr_ldm.net_spec(cfg, vae.latent_channels))
    sched, _ = hr_ldm.make_schedulers(cfg)
    batch = torch.utils.data.default_collate([cache[0], cache[1]])
    t, noise = torch.tensor([100, 600]), torch.randn_like(batch["z0"])
    # the fixture's centred spheres share their latent voxels evenly (a uniform weight cancels): uneven shares
    batch["nodule_share"] = batch["mask"] * torch.rand(batch["mask"].shape, generator=torch.Generator().manual_seed(0))
    plain = hr_ldm.hr_ldm_losses(net, sched, batch, None, 0.0, timesteps=t, noise=noise)
    one = hr_ldm.hr_ldm_losses(net, sched, batch, None, 0.0, timesteps=t, noise=noise, nodule_weight=1.0)
    twenty = hr_ldm.hr_ldm_losses(net, sched, batch, None, 0.0, timesteps=t, noise=noise, nodule_weight=20.0)
    assert torch.equal(plain["loss_eps"], one["loss_eps"])
    assert abs(float(twenty["loss_eps"]) - float(plain["loss_eps"])) > 1e-4
