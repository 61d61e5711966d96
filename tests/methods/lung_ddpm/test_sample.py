"""Chapter 06, Lung-DDPM's sample room: bad input, AAS exactness, sampling without AAS."""

from __future__ import annotations

import pytest
import torch
from lung_ddpm_toys import toy_batch

from lungsynth.methods import lung_ddpm as ld


def test_sample_rejects_bad_inputs(trained, toy_data):
    cfg, runs = trained
    model = ld.load(cfg, "layout", runs["layout"], train_if_missing=False)
    ct, layout = toy_batch(toy_data)
    with pytest.raises(ValueError, match="does not match the layout"):
        model.sample(layout, ct[:, :, :8])
    bad = layout.clone()
    bad[0, 0, 1, 1, 1] = 7
    with pytest.raises(ValueError, match="besides the three labels"):
        model.sample(bad, ct)
    with pytest.raises(ValueError, match="needs the reference"):
        model.sample(layout, None, aas=True)


def _alpha_bar(model, t):
    return 1.0 if t < 0 else float(model.scheduler.alphas_cumprod[t].double())


def test_aas_blends_the_diffused_reference_inside_the_loop(trained, toy_data):
    """Every intermediate x_t outside m_l is q(reference, t), i.e. sqrt(ab_t) ref + sqrt(1 - ab_t) eps.

    ``sample()`` pastes the reference into its output afterwards, so the output says nothing about the
    loop. Two references that differ only outside the lungs, sampled with one seed (the reference noise
    comes from the seed, not from the reference), must give states whose difference outside is exactly
    sqrt(ab_t) times the references' difference (the sampler alone never sees the reference), and whose
    residual (x_t - sqrt(ab_t) ref) / sqrt(1 - ab_t) is standard normal noise.
    """
    cfg, runs = trained
    ct, layout = toy_batch(toy_data)
    outside = ~ld.generation_mask(layout)
    other = torch.where(outside, 1.0 - ct, ct)  # the same lungs, another body around them
    delta = ld.to_model_scale(other) - ld.to_model_scale(ct)
    for variant in ld.VARIANTS:
        model = ld.load(cfg, variant, runs[variant], train_if_missing=False)
        (x, inter), (_, inter_other) = [model.sample(layout, ref, aas=True, generator=torch.Generator().manual_seed(0),
                                                     intermediates_every=1) for ref in (ct, other)]
        assert x.shape == ct.shape and bool(torch.isfinite(x).all())
        assert not torch.equal(x[~outside], ct[~outside])  # generated inside
        assert [it["timestep"] for it in inter] == [124, 0, -1]  # 3 respaced steps of T = 250
        for it, it_other in zip(inter, inter_other):
            ab = _alpha_bar(model, it["timestep"])
            diff = (it_other["sample"] - it["sample"])[outside]
            assert torch.allclose(diff, ab**0.5 * delta[outside], atol=1e-5), it["timestep"]
            if it["timestep"] >= 0:
                eps = (it["sample"] - ab**0.5 * ld.to_model_scale(ct))[outside] / (1.0 - ab) ** 0.5
                assert abs(float(eps.mean())) < 0.1 and abs(float(eps.std()) - 1.0) < 0.1, it["timestep"]
            else:
                assert torch.equal(it["sample"][outside], ld.to_model_scale(ct)[outside])
    # blend_from=100: the steps from t = 249 and t = 124 run free (outside does not follow the reference),
    # the last one (from t = 0) anchors, so the loop itself ends on the reference
    late = [model.sample(layout[:1], ref[:1], aas=True, blend_from=100, generator=torch.Generator().manual_seed(1),
                         intermediates_every=1)[1] for ref in (ct, other)]
    out1 = outside[:1]
    for k in (0, 1):
        assert torch.equal(late[0][k]["sample"][out1], late[1][k]["sample"][out1])
    assert torch.equal(late[0][2]["sample"][out1], ld.to_model_scale(ct[:1])[out1])


def test_aas_in_model_scale_through_the_shared_sampler(trained, toy_data):
    """The shared hook itself: the final x_0 in [-1, 1] equals the reference outside m_l."""
    cfg, runs = trained
    ct, layout = toy_batch(toy_data, 1)
    model = ld.load(cfg, "layout", runs["layout"], train_if_missing=False)
    x, inter = model.sample(layout, ct, aas=True, generator=torch.Generator().manual_seed(0),
                            intermediates_every=1)
    final = inter[-1]["sample"]
    outside = ~ld.generation_mask(layout)
    assert torch.equal(final[outside], ld.to_model_scale(ct)[outside])
    assert inter[-1]["timestep"] == -1 and len(inter) == cfg.lung_ddpm.sample_steps


def test_sampling_without_aas_generates_everywhere(trained, toy_data):
    cfg, runs = trained
    ct, layout = toy_batch(toy_data)
    model = ld.load(cfg, "layout", runs["layout"], train_if_missing=False)
    ct, layout = ct[:1], layout[:1]
    x, inter = model.sample(layout, ct, aas=False, generator=torch.Generator().manual_seed(0), intermediates_every=1)
    outside = ~ld.generation_mask(layout)
    # the output is the loop's x_0 mapped from [-1, 1] to [0, 1] and clamped, by hand here (nothing pasted)
    assert x.shape == ct.shape and torch.allclose(x, ((inter[-1]["sample"] + 1.0) / 2.0).clamp(0.0, 1.0), atol=1e-6)
    assert not torch.equal(x[outside], ct[outside])
    y = model.sample(layout, None, aas=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, y)  # a seed gives one sample; without AAS the reference is not used


def test_without_lung_layout_only_the_nodule_is_generated(trained, toy_data):
    """The "w/o lung layout" row as the reference code samples it: the model never saw the lung, so AAS takes
    the lung from the reference too (q(reference, t) at every step) and generates inside the nodule only."""
    cfg, runs = trained
    ct, layout = toy_batch(toy_data)
    model = ld.load(cfg, "no_lung_layout", runs["no_lung_layout"], train_if_missing=False)
    x, inter = model.sample(layout, ct, aas=True, generator=torch.Generator().manual_seed(0), intermediates_every=1)
    nodule, lung = layout == 2, layout == 1
    assert torch.equal(x[~nodule], ct[~nodule]) and not torch.equal(x[nodule], ct[nodule])
    for it in inter[:-1]:  # the lung inside the loop is the diffused reference, never the model's own
        ab = _alpha_bar(model, it["timestep"])
        eps = (it["sample"] - ab**0.5 * ld.to_model_scale(ct))[lung] / (1.0 - ab) ** 0.5
        assert abs(float(eps.mean())) < 0.15 and abs(float(eps.std()) - 1.0) < 0.15, it["timestep"]
    assert torch.equal(inter[-1]["sample"][lung], ld.to_model_scale(ct)[lung])
    assert torch.equal(ld.generation_mask(layout, lung_layout=False), nodule)


def test_the_fast_sampler_anchors_the_reference_at_every_step(trained, toy_data):
    """DDIM (the fast sampler) with AAS: at every step the state outside m_l is the reference diffused to that
    step's noise level, and the last one is the reference itself; DDIM differs from DDPM inside."""
    cfg, runs = trained
    ct, layout = toy_batch(toy_data)
    model = ld.load(cfg, "layout", runs["layout"], train_if_missing=False)
    outside = ~ld.generation_mask(layout)
    x, inter = model.sample(layout, ct, sampler="ddim", generator=torch.Generator().manual_seed(0),
                            intermediates_every=1)
    assert len(inter) == cfg.lung_ddpm.sample_steps and inter[-1]["timestep"] == -1
    for it in inter[:-1]:
        ab = _alpha_bar(model, it["timestep"])
        eps = (it["sample"] - ab**0.5 * ld.to_model_scale(ct))[outside] / (1.0 - ab) ** 0.5
        assert abs(float(eps.mean())) < 0.1 and abs(float(eps.std()) - 1.0) < 0.1, it["timestep"]
    assert torch.equal(inter[-1]["sample"][outside], ld.to_model_scale(ct)[outside])
    assert torch.equal(x[outside], ct[outside])
    ddpm = model.sample(layout, ct, sampler="ddpm", generator=torch.Generator().manual_seed(0))
    assert not torch.equal(x[~outside], ddpm[~outside])
    with pytest.raises(ValueError, match="ddpm, ddim"):
        model.sample(layout, ct, sampler="euler")


def test_tiled_denoising_runs_the_net_on_the_grid_tiles(trained, toy_data):
    """`lung_ddpm.sample_tile` 8 on a 16^3 volume: the U-Net sees the eight 8^3 cubes of each volume on the shifted grid, each
    with the step's timestep, and a pointwise network gives the whole-volume output exactly; 0, or a tile no
    smaller than the volume, calls the net once on the whole volume (the grid itself: tests/diffusion)."""
    import copy

    cfg, runs = trained
    model = ld.load(cfg, "layout", runs["layout"], train_if_missing=False)
    shapes, steps = [], []

    def pointwise(x, t):
        shapes.extend([tuple(x.shape[2:])] * x.shape[0])
        steps.append(t.clone())
        return x[:, :1] * 2.0 + x[:, 1:2] - 0.01 * t.float().view(-1, 1, 1, 1, 1)

    model.unet = pointwise
    ct, layout = toy_batch(toy_data)
    x = torch.cat([ct * 2 - 1, ld.layout_channels(layout)], dim=1)
    t = torch.tensor([7, 7])
    whole = pointwise(x, t)
    shapes.clear(), steps.clear()
    for tile, expect_tiles in ((0, False), (16, False), (8, True)):
        c = copy.deepcopy(cfg)
        c.lung_ddpm.sample_tile = tile
        model.cfg = c
        out = model.denoise_fn(x, t)
        torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-5)
        assert all(s == ((8, 8, 8) if expect_tiles else (16, 16, 16)) for s in shapes), (tile, set(shapes))
        assert len(shapes) == (16 if expect_tiles else 2)  # two volumes
        assert all(bool((s == 7).all()) for s in steps)
        shapes.clear(), steps.clear()
    with pytest.raises(ValueError, match="one timestep"):
        model.denoise_fn(x, torch.tensor([7, 9]))
    assert ld.load(cfg, "layout", runs["layout"], train_if_missing=False).cfg.lung_ddpm.sample_tile == 0


def test_tile_borders_never_cut_the_layout_nodule(trained):
    """The shifted grid reads the nodule from the layout channels: a net that answers each tile with the tile's
    mean gives every voxel of a 2-voxel nodule the same value at every step, so no border ran through it."""
    import copy

    cfg, runs = trained
    model = ld.load(cfg, "layout", runs["layout"], train_if_missing=False)
    model.unet = lambda x, t: x[:, :1].mean(dim=(2, 3, 4), keepdim=True).expand(-1, 1, *x.shape[2:])
    c = copy.deepcopy(cfg)
    c.lung_ddpm.sample_tile = 8
    model.cfg = c
    layout = torch.ones(1, 1, 16, 16, 16)
    layout[..., 5:7, 5:7, 5:7] = 2
    x = torch.cat([torch.randn(1, 1, 16, 16, 16), ld.layout_channels(layout)], dim=1)
    for t in range(0, 250, 10):
        out = model.denoise_fn(x, torch.tensor([t]))[0, 0, 5:7, 5:7, 5:7]
        assert float(out.max() - out.min()) < 1e-6, t
