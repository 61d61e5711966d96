"""Chapter 07, sample room: classifier-free guided noise and deterministic generation."""

import torch

from lungsynth.methods.text2img import generate, guided_noise

PROMPT = "The nodule is nearly round in shape, solid internally, with mostly well-defined margins."


def test_guidance_scale_one_is_the_conditional_prediction(tiny_model):
    unet = tiny_model.unet.eval()
    z, t = torch.randn(2, 4, 4, 4), torch.tensor([10, 500])
    ctx, null = tiny_model.text([PROMPT, PROMPT]), tiny_model.text(["", ""])
    with torch.no_grad():
        cond = unet(z, t, encoder_hidden_states=ctx).sample
        uncond = unet(z, t, encoder_hidden_states=null).sample
        assert torch.equal(guided_noise(unet, z, t, ctx, null, 1.0), cond)
        assert torch.allclose(guided_noise(unet, z, t, ctx, null, 5.0), uncond + 5.0 * (cond - uncond), atol=1e-6)


def test_generate_is_deterministic_and_guidance_matters(tiny_model):
    a = generate(tiny_model, [PROMPT] * 2, guidance_scale=5.0, steps=4, seed=3, device=torch.device("cpu"))
    b = generate(tiny_model, [PROMPT] * 2, guidance_scale=5.0, steps=4, seed=3, device=torch.device("cpu"))
    c = generate(tiny_model, [PROMPT] * 2, guidance_scale=1.0, steps=4, seed=3, device=torch.device("cpu"))
    p = generate(tiny_model, [PROMPT] * 2, guidance_scale=5.0, steps=4, sampler="pndm", seed=3,
                 device=torch.device("cpu"))
    assert a.shape == (2, 1, 32, 32) and p.shape == a.shape and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
