"""bbox-LDM model room: the paper's attribute embedder, the condition encoder, box masks on the latent grid,
and the validation of attributes, boxes and configurations."""

import numpy as np
import pytest
import torch

from bbox_fakes import S
from lungsynth.methods import bbox_ldm as B

# --------------------------------------------------------------------------- the attribute embedder


def test_attribute_embedder_is_the_papers():
    emb = B.AttributeEmbedder(dim=10, hidden=128, out_dim=10)
    assert len(emb.tables) == 5 == len(B.ATTRIBUTES)
    for table in emb.tables:
        assert isinstance(table, torch.nn.Embedding) and tuple(table.weight.shape) == (5, 10)
    linears = [m for m in emb.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(50, 128), (128, 128), (128, 10)]
    assert sum(isinstance(m, torch.nn.ReLU) for m in emb.mlp) == 2
    out = emb(torch.randint(1, 6, (7, 5)))
    assert out.shape == (7, 10)
    # each attribute has its own table: changing one score changes the embedding
    a = torch.tensor([[1, 2, 3, 4, 5]])
    b = a.clone()
    b[0, 4] = 1
    assert not torch.allclose(emb(a), emb(b))


def test_condition_encoder_tokens():
    m = torch.zeros(3, 1, 16, 16)
    m[:, :, 4:8, 4:8] = 1
    ctx2 = B.ConditionEncoder(2, grid=4)(m)
    ctx3 = B.ConditionEncoder(3, grid=4)(m, torch.randint(1, 6, (3, 5)))
    assert ctx2.shape == (3, 16, 10) and ctx3.shape == (3, 17, 10)
    with pytest.raises(ValueError, match="configuration 3 needs attributes"):
        B.ConditionEncoder(3)(m)


def test_masks_and_latent_grid():
    boxes = np.array([[0, 0, 4], [10, 20, 5]])
    masks = B.box_masks(boxes, S)
    assert masks.shape == (2, 1, S, S) and masks[1].sum() == 25
    np.testing.assert_array_equal(B.boxes_from_masks(masks).numpy(), boxes)
    lat = B.mask_to_latent(masks, 4)
    assert lat.shape == (2, 1, 8, 8) and lat[1].sum() >= 1  # max-pool keeps a small box


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("bad", [[0, 1, 1, 1, 1], [1, 1, 6, 1, 1], [1, 1, 1, 1, 2.5]])
def test_bad_attributes_are_errors(bad):
    with pytest.raises(ValueError, match="1..5|integer"):
        B.validate_attributes([bad])
    with pytest.raises(ValueError):
        B.AttributeEmbedder()(torch.tensor([bad]))


def test_attribute_shape_error():
    with pytest.raises(ValueError, match=r"\[B, 5\]"):
        B.validate_attributes([[1, 2, 3]])


@pytest.mark.parametrize("box", [[-1, 0, 4], [0, 30, 4], [29, 0, 4], [5, 5, 0]])
def test_boxes_outside_the_image_are_errors(box):
    with pytest.raises(ValueError, match="outside|side"):
        B.validate_boxes([box], S)


def test_config_must_be_one_two_or_three():
    assert B.check_config("2") == 2
    with pytest.raises(ValueError, match="configuration"):
        B.check_config(4)
