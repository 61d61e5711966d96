"""Denoiser factories: MONAI DiffusionModelUNet builder and LAND's additive/concat U-Net (tiny sizes)."""

import pytest
import torch

from lungsynth.nn.unets import LandUNet, activation_bytes, count_parameters, diffusion_unet, land_unet

CH = (16, 16, 32)


def _pair(**kw):
    torch.manual_seed(0)
    add = land_unet(5, 4, CH, 2, (False, True, True), cross_attention_dim=8, skip="additive", **kw)
    torch.manual_seed(0)
    cat = land_unet(5, 4, CH, 2, (False, True, True), cross_attention_dim=8, skip="concat", **kw)
    return add, cat


def test_additive_and_concat_shapes_and_costs():
    add, cat = _pair()
    x, t, ctx = torch.randn(2, 5, 8, 8, 8), torch.tensor([3, 700]), torch.randn(2, 6, 8)
    for net in (add, cat):
        assert net(x, t, ctx).shape == (2, 4, 8, 8, 8)
    # the only difference is the merge: concat reads 2c channels in every decoder block (+ a 1x1 projection)
    assert count_parameters(add) < count_parameters(cat)
    assert activation_bytes(add, x, t, ctx) < activation_bytes(cat, x, t, ctx)


def test_output_starts_at_zero_and_depends_on_context_once_trained_layers_move():
    add, _ = _pair()
    x, t = torch.randn(1, 5, 8, 8, 8), torch.tensor([10])
    # MONAI zero-initialises the output conv: a fresh denoiser predicts 0
    assert torch.count_nonzero(add(x, t, torch.randn(1, 6, 8))) == 0
    with torch.no_grad():
        for p in add.parameters():
            p.add_(0.05 * torch.randn_like(p))
    y1, y2 = add(x, t, torch.zeros(1, 6, 8)), add(x, t, torch.ones(1, 6, 8))
    assert not torch.allclose(y1, y2)  # cross-attention reaches the output


def test_unconditional_land_unet_and_bad_inputs():
    net = LandUNet(4, 4, CH, 1, (False, False, True), cross_attention_dim=None)
    assert net(torch.randn(1, 4, 8, 8, 8), torch.tensor([5])).shape == (1, 4, 8, 8, 8)
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(1, 4, 6, 6, 6), torch.tensor([5]))
    with pytest.raises(ValueError, match="without cross-attention"):
        net(torch.randn(1, 4, 8, 8, 8), torch.tensor([5]), torch.randn(1, 2, 8))
    with pytest.raises(ValueError, match=r"\[B, 4, D, H, W\]"):
        net(torch.randn(1, 3, 8, 8, 8), torch.tensor([5]))
    cond = LandUNet(4, 4, CH, 1, cross_attention_dim=8)
    with pytest.raises(ValueError, match="pass context"):
        cond(torch.randn(1, 4, 8, 8, 8), torch.tensor([5]))
    with pytest.raises(ValueError, match="skip must be"):
        LandUNet(4, 4, CH, 1, skip="sum")


def test_five_level_land_unet_runs():
    net = land_unet(5, 4, (8, 8, 16, 16, 16), 2, cross_attention_dim=8, norm_num_groups=8)
    assert len(net.down_res) == 5 and all(len(r) == 2 for r in net.down_res)
    assert net(torch.randn(1, 5, 16, 16, 16), torch.tensor([1]), torch.randn(1, 8, 8)).shape == (1, 4, 16, 16, 16)


@pytest.mark.parametrize("dims", [2, 3])
def test_diffusion_unet_factory(dims):
    net = diffusion_unet(dims, 3, 2, (16, 16), 1, (False, True), cross_attention_dim=12, num_class_embeds=3,
                         num_head_channels=8)
    x = torch.randn(2, 3, *([8] * dims))
    y = net(x, torch.tensor([1, 2]), context=torch.randn(2, 4, 12), class_labels=torch.tensor([0, 2]))
    assert y.shape == (2, 2, *([8] * dims))
    with pytest.raises(ValueError, match="attention_levels"):
        diffusion_unet(dims, 3, 2, (16, 16), 1, (True,))
