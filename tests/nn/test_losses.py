"""Losses shared by the autoencoders and the methods: KL divergence, the packaged-encoder perceptual
loss (with a stand-in encoder), the patch adversarial loss."""

import math

import pytest
import torch
from torch import nn

from lungsynth.nn.losses import AstraPerceptualLoss, PatchAdversarial, build_perceptual_loss, kl_divergence


def test_kl_divergence_by_hand():
    mean = torch.zeros(2, 1, 2, 2)
    assert kl_divergence(mean, torch.ones_like(mean)) == pytest.approx(0.0, abs=1e-7)
    # one element mu = 1, sigma = e: 0.5 (1 + e^2 - 2 - 1) per element, summed per item, batch mean
    m, s = torch.tensor([[1.0]]), torch.tensor([[math.e]])
    assert kl_divergence(m, s).item() == pytest.approx(0.5 * (1 + math.e ** 2 - 2 - 1), rel=1e-5)


class _StandIn(nn.Module):
    """Same attribute names as the packaged I3ResNet-152, a thousand times smaller."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv3d(3, 4, (3, 7, 7), (1, 2, 2), (1, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(4)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool3d(3, 2, 1)
        self.layer1 = nn.Conv3d(4, 8, 3, padding=1)
        self.layer2 = nn.Conv3d(8, 8, 3, stride=2, padding=1)


@pytest.mark.parametrize("nd", [2, 3])
def test_astra_perceptual_loss_with_a_stand_in_encoder(nd):
    torch.manual_seed(0)
    loss = build_perceptual_loss("astra", nd, loader=_StandIn)
    assert isinstance(loss, AstraPerceptualLoss)
    x = torch.rand(2, 1, *([16] * nd))
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1).requires_grad_(True)
    assert loss(x, x).item() == 0.0
    val = loss(y, x)
    val.backward()
    assert val.item() > 0 and y.grad is not None and y.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in loss.encoder.parameters())
    loss.train()
    assert not loss.encoder.training  # frozen BatchNorm statistics


def test_perceptual_off_and_unavailable_network():
    assert build_perceptual_loss("off", 3) is None
    with pytest.raises(ValueError, match="pretrained weights.*perceptual_network=astra"):
        build_perceptual_loss("no-such-network", 2)


def test_patch_adversarial_losses():
    torch.manual_seed(0)
    adv = PatchAdversarial(2, 1, channels=8, num_layers=2, warmup_steps=5)
    assert not adv.active(4) and adv.active(5)
    real, fake = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32, requires_grad=True)
    g = adv.generator_loss(fake)
    g.backward()
    assert fake.grad is not None
    d = adv.discriminator_loss(real, fake)
    assert d.item() > 0 and d.requires_grad
