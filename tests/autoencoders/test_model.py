"""Chapter 02 autoencoder networks without training: shapes, x4 compression, bad input, checkpoints,
sliding windows, codebook statistics (tiny sizes, fixed seeds)."""

import pytest
import torch

from lungsynth.config import get_config
from lungsynth.autoencoders import (KINDS, Autoencoder, autoencoder_spec, build_autoencoder, codebook_stats,
                                    load_autoencoder)

TINY = {"autoencoders.vae3d_channels": "8,8,8", "autoencoders.maskvae_channels": "4,8,8",
        "autoencoders.vae2d_channels": "8,8,8", "autoencoders.vqvae2d_channels": "8,8",
        "autoencoders.vq_num_embeddings": 16}


@pytest.fixture(scope="module")
def cfg():
    return get_config("smoke", TINY)


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_and_x4_compression(cfg, kind):
    torch.manual_seed(0)
    ae = build_autoencoder(kind, cfg).eval()
    nd = ae.spatial_dims
    x = torch.rand(2, 1, *([16] * nd))
    mean, std = ae.encode(x)
    c = cfg.autoencoders.mask_latent_channels if kind == "maskvae" else (
        cfg.autoencoders.vq_embedding_dim if kind == "vqvae2d" else cfg.autoencoders.latent_channels)
    assert mean.shape == std.shape == (2, c, *([4] * nd))
    assert ae.latent_shape(16) == (c, *([4] * nd))
    assert ae.decode(mean).shape == x.shape
    out = ae(x)
    assert out["recon"].shape == x.shape
    z = ae.encode_latent(x)
    assert z.shape == mean.shape
    assert ae.decode_latent(z).shape == x.shape
    if kind == "vqvae2d":
        assert torch.count_nonzero(std) == 0  # deterministic codes
        # the latent is a codebook entry at every position
        codes = ae.net.quantizer.quantizer.embedding.weight  # [K, D]
        flat = mean.permute(0, 2, 3, 1).reshape(-1, mean.shape[1])
        assert torch.cdist(flat, codes).min(dim=1).values.max() < 1e-5
    else:
        assert (std > 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_size_says_which_sizes_work(cfg, kind):
    ae = build_autoencoder(kind, cfg)
    with pytest.raises(ValueError, match="multiples of 4"):
        ae.encode(torch.rand(1, 1, *([18] * ae.spatial_dims)))
    with pytest.raises(ValueError, match="shaped"):
        ae.encode(torch.rand(1, 2, *([16] * ae.spatial_dims)))  # two channels
    with pytest.raises(ValueError, match="multiples of 4"):
        ae.latent_shape(30)


def test_unknown_kind_and_bad_channels(cfg):
    with pytest.raises(ValueError, match="valid kinds"):
        build_autoencoder("vae4d", cfg)
    bad = get_config("smoke", {"autoencoders.vae3d_channels": "8,8"})
    with pytest.raises(ValueError, match="3 channel levels"):
        build_autoencoder("vae3d", bad)


def _fake_run(tmp_path, kind, cfg, scale=0.5):
    """A final.pt as train_autoencoder writes it (engine format, scale factor in the config)."""
    from lungsynth.engine import CHECKPOINT_FORMAT, save_checkpoint

    torch.manual_seed(1)
    ae = build_autoencoder(kind, cfg)
    run = tmp_path / kind
    save_checkpoint({"format": CHECKPOINT_FORMAT, "kind": kind, "config": {**ae.spec, "scale_factor": scale},
                     "step": 7, "modules": {"autoencoder": ae.state_dict()}, "ema": None}, run / "final.pt")
    return ae, run


def test_checkpoint_round_trip_and_refusals(tmp_path, cfg):
    ae, run = _fake_run(tmp_path, "vae3d", cfg, scale=0.5)
    loaded = load_autoencoder("vae3d", run, cfg)
    assert loaded.scale_factor == 0.5 and loaded.step == 7 and not loaded.training
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded.encode(x)[0], ae.eval().encode(x)[0], atol=1e-6)
        # encode_latent / decode_latent apply the scale factor
        assert torch.allclose(loaded.encode_latent(x, sample=False), 0.5 * loaded.encode(x)[0])
    with pytest.raises(ValueError, match="kind 'vae3d'.*'maskvae' was asked"):
        load_autoencoder("maskvae", run, cfg)
    other = get_config("smoke", {**TINY, "autoencoders.vae3d_channels": "8,16,16"})
    with pytest.raises(ValueError, match="channels"):
        load_autoencoder("vae3d", run, other)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no final.pt"):
        load_autoencoder("vae3d", tmp_path / "empty", cfg)
    with pytest.raises(FileNotFoundError, match="no autoencoder checkpoint"):
        load_autoencoder("vae3d", tmp_path / "missing.pt", cfg)


def test_sliding_window_shapes_and_window_rules(cfg):
    """Tiled encode/decode give the whole pass's shapes; a window as large as the input is the
    whole pass itself. (Closeness of tiles to the whole pass needs a trained model: see
    test_ae_training.py; a random GroupNorm network has no reason to be local.)"""
    torch.manual_seed(0)
    ae = build_autoencoder("vae3d", cfg).eval()
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        mean, std = ae.encode(x)
        smean, sstd = ae.encode(x, roi_size=16, overlap=0.5)
        assert smean.shape == mean.shape and sstd.shape == std.shape
        whole = ae.decode(mean)
        tiled = ae.decode(mean, roi_size=16, overlap=0.5)
        assert tiled.shape == whole.shape == x.shape
        assert 0 <= float(tiled.min()) and float(tiled.max()) <= 1  # decodings stay in [0,1]
        assert torch.equal(ae.decode(mean, roi_size=32), whole)
        assert torch.equal(ae.encode(x, roi_size=64)[0], mean)
    with pytest.raises(ValueError, match="multiple"):
        ae.decode(mean, roi_size=10)


def test_codebook_usage_and_perplexity_by_hand():
    # 4 codes of 8, used 4, 2, 1, 1 times: p = (1/2, 1/4, 1/8, 1/8), H = 1.75 bits
    idx = torch.tensor([[0, 0, 0, 0], [1, 1, 2, 3]])
    stats = codebook_stats(idx, 8)
    assert stats["usage"] == 0.5 and stats["codes_used"] == 4
    assert stats["perplexity"] == pytest.approx(2 ** 1.75)
    assert codebook_stats(torch.zeros(10, dtype=torch.long), 8)["perplexity"] == pytest.approx(1.0)
    assert codebook_stats(torch.arange(8), 8)["perplexity"] == pytest.approx(8.0)
    with pytest.raises(ValueError, match="indices must lie"):
        codebook_stats(torch.tensor([8]), 8)


def test_spec_is_plain_and_rebuilds(cfg):
    for kind in KINDS:
        spec = autoencoder_spec(kind, cfg)
        ae = Autoencoder(spec)
        assert ae.spec == {k: v for k, v in spec.items()}
        assert Autoencoder(ae.spec).spec == ae.spec
