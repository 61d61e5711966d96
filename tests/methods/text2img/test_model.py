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
