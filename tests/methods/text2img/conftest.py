"""Shared fixtures of chapter 07's tests: a tiny diffusers Stable Diffusion folder and the model built from it."""

import pytest
from sd_tiny import save_tiny_sd_pipeline

from lungsynth.methods.text2img import Text2ImgModel, load_pretrained_parts


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipeline")


@pytest.fixture()
def tiny_model(tiny_pipeline):
    unet, text, codec, sched = load_pretrained_parts(tiny_pipeline)
    return Text2ImgModel(unet, text, codec, sched, latent_channels=4, latent_size=4, source=str(tiny_pipeline))
