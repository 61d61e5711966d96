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


def test_condition_encoder_flattens_the_mask_as_the_paper():
    """Mari §2.2: the mask and the attribute embedding enter cross-attention "by flattening and concatenating the
    vectors": one token, the mask's values exactly, then (config 3) the D' attribute values."""
    m = torch.zeros(3, 1, 16, 16)
    m[:, :, 4:8, 4:8] = 1
    attrs = torch.randint(1, 6, (3, 5))
    enc2, enc3 = B.ConditionEncoder(2, latent_size=16), B.ConditionEncoder(3, latent_size=16)
    ctx2, ctx3 = enc2(m), enc3(m, attrs)
    assert ctx2.shape == (3, 1, 256) and ctx3.shape == (3, 1, 266)
    assert (enc2.context_dim, enc3.context_dim) == (256, 266)
    torch.testing.assert_close(ctx2[:, 0], m.flatten(1))
    torch.testing.assert_close(ctx3[:, 0, :256], m.flatten(1))
    torch.testing.assert_close(ctx3[:, 0, 256:], enc3.attributes(attrs))
    assert not any(p.requires_grad for n, p in enc2.named_parameters())  # config 2 flat: nothing to learn here
    with pytest.raises(ValueError, match="configuration 3 needs attributes"):
        enc3(m)
    with pytest.raises(ValueError, match=r"built for \[B, 1, 16, 16\]"):
        enc2(torch.zeros(3, 1, 8, 8))
    with pytest.raises(ValueError, match="needs latent_size"):
        B.ConditionEncoder(2)


def test_condition_encoder_pooled_tokens_are_a_named_option():
    m = torch.zeros(3, 1, 16, 16)
    m[:, :, 4:8, 4:8] = 1
    ctx2 = B.ConditionEncoder(2, grid=4, mask_context="pooled")(m)
    ctx3 = B.ConditionEncoder(3, grid=4, mask_context="pooled")(m, torch.randint(1, 6, (3, 5)))
    assert ctx2.shape == (3, 16, 10) and ctx3.shape == (3, 17, 10)
    with pytest.raises(ValueError, match="unknown bbox_ldm.mask_context 'tokens'"):
        B.ConditionEncoder(2, mask_context="tokens", latent_size=16)
    assert B.run_name(2, mask_context="pooled") == "04_bbox_ldm_config2_pooled"
    assert B.run_name(1, mask_context="pooled") == "04_bbox_ldm_config1"  # no cross-attention: one run
    assert B.run_name(3, lung=True) == "04_bbox_ldm_config3_lung"


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


# --------------------------------------------------------------------------- a pretrained diffusers VQ-VAE


def _tiny_vq(folder, cls_name="VQModel"):
    """A randomly initialised two-level diffusers model (x2) saved with save_pretrained (safetensors)."""
    import diffusers

    kw = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
              latent_channels=3, norm_num_groups=4)
    if cls_name == "VQModel":
        model = diffusers.VQModel(**kw, num_vq_embeddings=16, vq_embed_dim=3, scaling_factor=1.0)
    else:
        model = diffusers.AutoencoderKL(**kw)
    model.save_pretrained(folder)
    return folder


def test_a_pretrained_diffusers_vq_is_used_frozen_and_recorded(tiny_setup, tmp_path):
    import copy

    import torch

    cfg, data, ae, root = tiny_setup
    vq = B.PretrainedVQ(_tiny_vq(tmp_path / "vq"))
    assert vq.downsample == 2 and vq.latent_channels == 3 and not any(p.requires_grad for p in vq.parameters())
    z = vq.encode_latent(data["images"][:2])
    assert z.shape == (2, 3, 16, 16)
    x = vq.decode_latent(z)
    assert x.shape == (2, 1, 32, 32) and 0 <= float(x.min()) and float(x.max()) <= 1
    cfg = copy.deepcopy(cfg)
    cfg.bbox_ldm.pretrained_vq = str(tmp_path / "vq")
    run = B.train(cfg, 1, root / "pretrained", data=data, progress=False)
    model = B.load(cfg, 1, run, device="cpu")
    assert isinstance(model.ae, B.PretrainedVQ) and model.task.config()["autoencoder"] == vq.identity
    assert model.sample(data["boxes"][:1], data["attributes"][:1]).shape == (1, 1, 32, 32)
    with pytest.raises(ValueError, match="config"):  # the course's own VQ-VAE is another autoencoder
        B.load(cfg, 1, run, device="cpu", ae=ae)


def test_a_pretrained_folder_of_another_kind_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a diffusers 'VQModel'"):
        B.PretrainedVQ(_tiny_vq(tmp_path / "kl", "AutoencoderKL"))
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        B.PretrainedVQ(tmp_path)
