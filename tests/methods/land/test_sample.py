"""LAND (chapter 03) sample room: conditioning at sampling time, DDIM and DDPM from one checkpoint
(the tiny LAND-Mask run of ``conftest.py``)."""

import pytest
import torch
from land_tiny import phantom_cond, tiny_cfg

from lungsynth.methods import land


def test_conditioning_changes_the_sample_where_the_mask_changed(trained_mask_run):
    from lungsynth.diffusion.samplers import sample as reverse

    cfg, run = trained_mask_run
    den = land.load_denoiser(run)
    sched = land.make_scheduler(den.spec, "ddim")
    a = torch.zeros(1, 1, 8, 8, 8)
    a[..., 1:3, 1:3, 1:3] = 1
    b = torch.zeros(1, 1, 8, 8, 8)
    b[..., 5:7, 5:7, 5:7] = 1
    outs = [reverse(lambda x, t, **kw: den(x, t, **kw), sched, (1, 4, 8, 8, 8), 10,
                    generator=torch.Generator().manual_seed(1), condition={"concat": g, "grid": g}, progress=False)
            for g in (a, b)]
    diff = (outs[0] - outs[1]).abs().mean(1)[0]
    changed = (a != b)[0, 0]
    # 16 of 512 latent voxels changed; the samples differ mostly there (same seed, same noise)
    assert diff[changed].mean() > 2 * diff[~changed].mean()


class _Stretched:
    """The untrained tiny VAE's decoder output stretched (3 x - 1) so that some voxels leave [0, 1]."""

    def __init__(self, vae):
        self.vae, self.downsample = vae, vae.downsample

    def decode_latent(self, z, **kw):
        return 3.0 * self.vae.decode_latent(z, **kw) - 1.0


def test_ddim_and_ddpm_sample_from_the_same_checkpoint(trained_mask_run):
    from lungsynth.autoencoders import build_autoencoder

    _, run = trained_mask_run
    cfg = tiny_cfg(32, **{"data.hu_min": -1200.0, "data.hu_max": 600.0})  # not the default window (-1000, 400)
    torch.manual_seed(0)
    vae = _Stretched(build_autoencoder("vae3d", cfg).eval())
    model = land.LandModel("mask", land.load_denoiser(run), vae, None, cfg, run, torch.device("cpu"))
    cond = phantom_cond(32, (12, 12, 12), 8)
    ddim = land.sample(model, cond, 2, sampler="ddim", seed=0)
    ddpm = land.sample(model, cond, 2, sampler="ddpm", seed=0)  # cfg.land.ddpm_steps (8) respaced DDPM steps
    assert ddim["steps"] == 4 and ddpm["steps"] == 8
    for out in (ddim, ddpm):
        assert out["latents"].shape == (2, 4, 8, 8, 8) and out["ct_hu"].shape == (2, 1, 32, 32, 32)
        assert torch.isfinite(out["latents"]).all()
        # the volume is the decoded latents, clamped to [0, 1] and mapped by the config's window, by hand here
        with torch.no_grad():
            decoded = model.vae.decode_latent(out["latents"], roi_size=cfg.autoencoders.sliding_roi).float()
        assert (decoded < 0).any() and (decoded > 1).any()  # the clamp bites on both sides ...
        assert ((decoded > 0) & (decoded < 1)).float().mean() > 0.25  # ... and leaves many voxels to the map
        assert torch.allclose(out["ct"], decoded.clamp(0.0, 1.0), atol=1e-6)
        assert torch.allclose(out["ct_hu"], -1200.0 + 1800.0 * decoded.clamp(0.0, 1.0), atol=1e-3)
    assert not torch.allclose(ddim["latents"], ddpm["latents"])
    # both samplers follow the mask the model was trained on: latents are higher inside the nodule
    for out in (ddim, ddpm):
        z = out["latents"].mean(1)
        inside = torch.zeros(8, 8, 8, dtype=torch.bool)
        inside[3:5, 3:5, 3:5] = True
        assert z[:, inside].mean() > z[:, ~inside].mean()
    with pytest.raises(ValueError, match="not LAND classes"):
        land.sample(model, cond * 0.9, 1)
    with pytest.raises(ValueError, match="unknown sampler"):
        land.sample(model, cond, 1, sampler="euler")


def test_chunked_sampling_equals_one_batch(trained_mask_run):
    """Each volume has its own noise stream: drawn in one batch, in chunks of 2 or alone, it is the same."""
    from lungsynth.autoencoders import build_autoencoder

    _, run = trained_mask_run
    cfg = tiny_cfg(32)
    torch.manual_seed(0)
    model = land.LandModel("mask", land.load_denoiser(run), build_autoencoder("vae3d", cfg).eval(), None, cfg,
                           run, torch.device("cpu"))
    conds = torch.cat([phantom_cond(32, (8 + 4 * i, 12, 12), 8) for i in range(3)])
    for sampler in ("ddim", "ddpm"):
        whole = land.sample(model, conds, 3, sampler=sampler, seed=5, batch=3)
        parts = land.sample(model, conds, 3, sampler=sampler, seed=5, batch=2)
        alone = land.sample(model, conds[2:], 1, sampler=sampler, seed=5, batch=1, first_index=2)
        assert torch.allclose(whole["latents"], parts["latents"], atol=1e-4)
        assert torch.allclose(whole["latents"][2:], alone["latents"], atol=1e-4)
        assert torch.allclose(whole["ct"], parts["ct"], atol=1e-4)
        assert not torch.allclose(whole["latents"][0], whole["latents"][1], atol=1e-2)  # other streams
    assert not torch.allclose(land.sample(model, conds, 3, seed=6)["latents"], whole["latents"], atol=1e-2)
