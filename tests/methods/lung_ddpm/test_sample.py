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


def test_aas_keeps_the_reference_outside_the_lung(trained, toy_data):
    cfg, runs = trained
    ct, layout = toy_batch(toy_data)
    outside = ~ld.generation_mask(layout)
    for variant in ld.VARIANTS:
        model = ld.load(cfg, variant, runs[variant], train_if_missing=False)
        x = model.sample(layout, ct, aas=True, generator=torch.Generator().manual_seed(0))
        assert x.shape == ct.shape and bool(torch.isfinite(x).all())
        assert torch.equal(x[outside], ct[outside])  # exactly the reference outside the lungs
        assert not torch.equal(x[~outside], ct[~outside])  # generated inside
    # AAS from a late step on still ends on the reference
    late = model.sample(layout[:1], ct[:1], aas=True, blend_from=50, generator=torch.Generator().manual_seed(1))
    assert torch.equal(late[outside[:1]], ct[:1][outside[:1]])


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
    x = model.sample(layout, ct, aas=False, generator=torch.Generator().manual_seed(0))
    outside = ~ld.generation_mask(layout)
    assert x.shape == ct.shape and float(x.min()) >= 0 and float(x.max()) <= 1
    assert not torch.equal(x[outside], ct[outside])
    y = model.sample(layout, None, aas=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, y)  # a seed gives one sample; without AAS the reference is not used
