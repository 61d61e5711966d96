"""Chapter 07, model room: the check of a local Stable Diffusion pipeline folder."""

import pytest

from lungsynth.methods.text2img import check_pipeline_folder


def test_pipeline_folder_check_names_what_is_missing(tmp_path, tiny_pipeline):
    assert check_pipeline_folder(tiny_pipeline) == tiny_pipeline
    (tmp_path / "unet").mkdir()
    with pytest.raises(ValueError, match=r"missing model_index.json, unet/config.json, vae/config.json"):
        check_pipeline_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        check_pipeline_folder(tmp_path / "nowhere")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_loss_regresses_the_target_the_scheduler_samples_with(tmp_path, prediction_type):
    """SD 2.0 (the paper's best model) is a v-prediction model: training it on the noise while its scheduler reads
    the output as v trains one target and samples another."""
    import torch
    import torch.nn.functional as F
    from sd_tiny import save_tiny_sd_pipeline

    from lungsynth.methods.text2img import Text2ImgModel, diffusion_loss, load_pretrained_parts, sample_scheduler

    folder = save_tiny_sd_pipeline(tmp_path / "sd", prediction_type=prediction_type)
    unet, text, codec, sched = load_pretrained_parts(folder)
    model = Text2ImgModel(unet.eval(), text, codec, sched, latent_channels=4, latent_size=4, source=str(folder))
    assert sched.config.prediction_type == prediction_type
    assert sample_scheduler("ddim", sched).config.prediction_type == prediction_type  # sampling reads the same
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    t, ctx = torch.tensor([100, 900]), text(["", ""])
    with torch.no_grad():
        pred = unet(sched.add_noise(z0, noise, t), t, encoder_hidden_states=ctx).sample
        loss = diffusion_loss(model, z0, noise, t, ctx)
    target = noise if prediction_type == "epsilon" else sched.get_velocity(z0, noise, t)
    assert loss == pytest.approx(F.mse_loss(pred, target).item(), rel=1e-5)
    assert (loss == pytest.approx(F.mse_loss(pred, noise).item(), rel=1e-5)) == (prediction_type == "epsilon")


def test_a_pipeline_without_a_component_or_with_an_unknown_target_is_refused(tmp_path):
    import json

    from sd_tiny import save_tiny_sd_pipeline

    from lungsynth.methods.text2img import train_scheduler

    with pytest.raises(ValueError, match=r"missing text_encoder/config.json"):
        check_pipeline_folder(save_tiny_sd_pipeline(tmp_path / "a", drop="text_encoder"))
    folder = save_tiny_sd_pipeline(tmp_path / "b")
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "sample"}))
    with pytest.raises(ValueError, match=r"scheduler_config.json: prediction_type 'sample' is not supported"):
        train_scheduler(folder=folder)


def test_the_nodule_disk_weight_counts_the_centre_and_1_is_the_printed_loss():
    """text2img.nodule_weight: an error at the ROI's centre (where the nodule is) costs more as the weight grows, one
    at a corner less (a weighted mean); weight 1 is SD's plain mean squared error."""
    import torch
    import torch.nn.functional as F

    from lungsynth.methods.text2img import Text2ImgModel, diffusion_loss, nodule_disk_weight

    weight = nodule_disk_weight(16, 16, 5.0)
    assert weight[8, 8] == 5 and weight[0, 0] == 1 and weight[8, 4] == 5 and weight[8, 3] == 1  # radius side / 4
    assert torch.equal(nodule_disk_weight(16, 16, 1.0), torch.ones(16, 16))

    class Zero(torch.nn.Module):  # predicts 0, so the loss is the weighted mean of target^2
        def forward(self, z, t, encoder_hidden_states=None):
            return type("Out", (), {"sample": torch.zeros_like(z)})()

    class Sched:  # z_t = z0, target = noise (epsilon)
        config = type("C", (), {"prediction_type": "epsilon"})()

        def add_noise(self, z0, noise, t):
            return z0

    model = Text2ImgModel(Zero(), None, None, Sched(), latent_channels=1, latent_size=16, source="test")
    centre, corner = torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16)
    centre[..., 8, 8], corner[..., 0, 0] = 1.0, 1.0
    z0, t = torch.zeros(1, 1, 16, 16), torch.tensor([0])

    def loss(noise, w):
        return float(diffusion_loss(model, z0, noise, t, None, nodule_weight=w))

    assert loss(centre, 1.0) == pytest.approx(F.mse_loss(centre, z0).item())
    assert loss(centre, 5.0) > 2 * loss(centre, 1.0) and loss(corner, 5.0) < loss(corner, 1.0)
