"""Chapter 07, train room: the engine task, augmentation, prompt dropout, fine-tuning a local SD folder."""

import numpy as np
import pytest
import torch

from lungsynth.methods.text2img import Text2ImgTask, augment, drop_prompts

PROMPT = "The nodule is nearly round in shape, solid internally, with mostly well-defined margins."


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


def test_the_configured_nodule_weight_reaches_training(tiny_pipeline, tmp_path):
    """text2img.nodule_weight trains through to the weights: the printed objective (1) and weight 5 end apart."""
    from lungsynth.config import get_config
    from lungsynth.methods.text2img import load, train

    def trained(weight):
        cfg = get_config("smoke", {"data.roi_size": 32, "text2img.batch_size": 2, "text2img.pretrained_lr": 1e-3,
                                   "text2img.nodule_weight": weight})
        run_dir = train(cfg, pretrained=tiny_pipeline, run_dir=tmp_path / str(weight), max_steps=2, data=_Rois())
        return load(cfg, run_dir, pretrained=tiny_pipeline).unet.state_dict()

    one, again, five = trained(1.0), trained(1.0), trained(5.0)
    assert all(torch.equal(one[k], again[k]) for k in one)  # the same run twice is the same
    assert any(not torch.equal(one[k], five[k]) for k in one)


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


def test_a_model_from_scratch_starts_from_the_same_weights(monkeypatch):
    """Built from scratch, the U-Net's initial weights come from cfg.seed, whatever drew from the global RNG before
    (in a chapter: the codec's training), and building leaves the global RNG where it was."""
    from lungsynth.config import get_config
    from lungsynth.methods.text2img import model as t2i

    monkeypatch.setattr(t2i, "course_codec", lambda cfg: None)  # the codec is not what this test is about
    cfg = get_config("smoke", {"data.roi_size": 32})
    first = t2i.build_model(cfg).unet.state_dict()
    torch.rand(1000)
    state = torch.get_rng_state()
    second = t2i.build_model(cfg).unet.state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_training_keeps_the_checkpoint_of_the_lowest_validation_kid(tiny_pipeline, tmp_path):
    """The paper stops on validation KID (§2.3): the run validates every val_every steps, best.pt holds the lowest,
    sampling loads it and the run record says which."""
    import json

    from lungsynth.config import get_config
    from lungsynth.engine import BEST_NAME, load_checkpoint, read_metrics
    from lungsynth.eval.features import build_slice_net
    from lungsynth.methods.text2img import ValidationKid, load, train

    cfg = get_config("smoke", {"data.roi_size": 32, "text2img.batch_size": 2, "text2img.pretrained_lr": 1e-3,
                               "text2img.val_every": 2})
    real = torch.stack([_Rois()[i]["image"] for i in range(4)])
    validation = ValidationKid(real, [PROMPT] * 4, build_slice_net(width=8, feature_dim=16), guidance_scale=5.0,
                               steps=2, sampler="ddim")
    run_dir = train(cfg, pretrained=tiny_pipeline, run_dir=tmp_path / "run", max_steps=6, data=_Rois(),
                    validation=validation)
    kids = read_metrics(run_dir)["val_kid"]
    kids = kids[np.isfinite(kids)]
    assert len(kids) == 3
    best = load_checkpoint(run_dir / BEST_NAME)["best"]
    assert best["value"] == pytest.approx(kids.min()) and best["step"] == 2 * (1 + int(np.argmin(kids)))
    record = json.loads((run_dir / "run.json").read_text())
    assert record["results"]["selected"] == {"checkpoint": BEST_NAME, "step": best["step"], "val_kid": pytest.approx(best["value"])}
    model = load(cfg, run_dir, pretrained=tiny_pipeline)
    weights = load_checkpoint(run_dir / BEST_NAME)["modules"]["unet"]
    assert all(torch.equal(v, model.unet.state_dict()[k]) for k, v in weights.items())
