"""Chapter 07: the text-to-image LDM (prompt writer tests live in tests/data/test_prompts.py)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from sd_tiny import save_tiny_sd_pipeline  # noqa: E402

from lungsynth.methods.text2img import Text2ImgTask, augment, check_pipeline_folder, drop_prompts, generate, guided_noise  # noqa: E402
from lungsynth.methods.text2img.model import Text2ImgModel, load_pretrained_parts  # noqa: E402

PROMPT = ("The nodule is nearly round in shape, solid internally, with mostly well-defined margins, "
          "no spiculation and no calcification.")


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipeline")


@pytest.fixture()
def tiny_model(tiny_pipeline):
    unet, text, codec, sched = load_pretrained_parts(tiny_pipeline)
    return Text2ImgModel(unet, text, codec, sched, latent_channels=4, latent_size=4, source=str(tiny_pipeline))


def test_pipeline_folder_check_names_what_is_missing(tmp_path, tiny_pipeline):
    assert check_pipeline_folder(tiny_pipeline) == tiny_pipeline
    (tmp_path / "unet").mkdir()
    with pytest.raises(ValueError, match=r"missing model_index.json, unet/config.json, vae/config.json"):
        check_pipeline_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        check_pipeline_folder(tmp_path / "nowhere")


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


def test_training_step_moves_only_the_unet(tiny_model):
    task = Text2ImgTask(tiny_model, prompt_dropout=0.5)
    torch.manual_seed(0)
    loss = task.training_step({"image": torch.rand(2, 1, 32, 32), "prompt": [PROMPT, PROMPT]}, 0)["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None for p in tiny_model.unet.parameters())
    assert all(p.grad is None for p in tiny_model.text.parameters())
    assert all(p.grad is None for p in tiny_model.codec.parameters())


def test_augmentation_and_prompt_dropout():
    torch.manual_seed(0)
    image = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(8, 1, 1, 1)
    out = augment(image)
    assert out.shape == image.shape
    assert all(torch.equal(o.flatten().sort().values, image[0].flatten().sort().values) for o in out)
    assert drop_prompts(["a", "b"], 1.0) == ["", ""] and drop_prompts(["a", "b"], 0.0) == ["a", "b"]


class _Rois(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"image": torch.rand(1, 32, 32, generator=g), "prompt": PROMPT if i % 2 else ""}


def test_fine_tunes_a_local_stable_diffusion_folder(tiny_pipeline, tmp_path):
    from diffusers import UNet2DConditionModel

    from lungsynth.config import get_config
    from lungsynth.methods.text2img import load, train

    cfg = get_config("smoke", {"data.roi_size": 32, "text2img.batch_size": 2, "text2img.pretrained_lr": 1e-3})
    run_dir = train(cfg, pretrained=tiny_pipeline, run_dir=tmp_path / "run", max_steps=3, data=_Rois())
    assert (run_dir / "final.pt").is_file() and (run_dir / "run.json").is_file()
    tuned = load(cfg, run_dir, pretrained=tiny_pipeline)
    original = UNet2DConditionModel.from_pretrained(tiny_pipeline, subfolder="unet")
    changed = [not torch.equal(a, b) for a, b in zip(tuned.unet.state_dict().values(), original.state_dict().values())]
    assert any(changed)
    assert tuned.text.name == "sd-clip" and tuned.codec.sd
    with pytest.raises(ValueError, match="kind"):
        from lungsynth.engine import load_weights
        load_weights(run_dir, kind="vae3d")
