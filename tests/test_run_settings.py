"""lungsynth/run_settings.py: an override that changes how a run is trained never reuses the profile's run."""

from __future__ import annotations

import ast
import json
import re

import pytest

from lungsynth import run_settings
from lungsynth.config import get_config
from lungsynth.data.datasets import prepared_folder, preparation_settings
from lungsynth.paths import PACKAGE_DIR, prepared_dir

NOTEBOOKS = PACKAGE_DIR.parent / "notebooks"
# the runs a section's settings train, as (section, autoencoder kinds), and their default run folders
TRAINED_BY = {"autoencoders": [(None, (k,)) for k in run_settings.AUTOENCODER_KEYS],
              "land": [("land", ("vae3d", "maskvae"))], "bbox_ldm": [("bbox_ldm", ("vqvae2d",))],
              "hr_ldm": [("hr_ldm", ("vae3d",))], "lung_ddpm": [("lung_ddpm", ())],
              "text2img": [("text2img", ("vae2d",))]}


def try_this_overrides() -> list[tuple[str, str, object]]:
    """(chapter, key, value) of every ``"section.key": value`` a chapter's "Try this" cell suggests."""
    found = []
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            text = "".join(cell["source"])
            if "Try this" not in text:
                continue
            for key, value in re.findall(r'"([a-z_0-9]+\.[a-z_0-9]+)":\s*("[^"]*"|True|False|-?[0-9][0-9.e]*)', text):
                found.append((path.stem, key, ast.literal_eval(value.strip())))
    return found


def test_the_profile_keeps_its_run_names():
    cfg = get_config("smoke")
    assert run_settings.run_name(cfg, "05_hr_ldm_hist", "hr_ldm", ("vae3d",)) == "05_hr_ldm_hist"
    assert run_settings.changed_settings(cfg, "land", ("vae3d", "maskvae")) == {}


def test_a_training_override_gets_its_own_run_and_a_sampling_override_does_not():
    trained = get_config("smoke", {"hr_ldm.train_steps": 400, "hr_ldm.hist_weight": 1.0})
    assert run_settings.run_name(trained, "05_hr_ldm_hist", "hr_ldm", ("vae3d",)) == \
        "05_hr_ldm_hist@hist_weight=1.0+train_steps=400"
    sampled = get_config("smoke", {"hr_ldm.ddim_steps": 50, "hr_ldm.clip_latent": 0.0})
    assert run_settings.run_name(sampled, "05_hr_ldm_hist", "hr_ldm", ("vae3d",)) == "05_hr_ldm_hist"
    # the autoencoder a method decodes through shapes it too; another kind's settings do not
    vq = get_config("smoke", {"autoencoders.vq_num_embeddings": 256})
    assert run_settings.run_name(vq, "04_bbox_ldm_config3", "bbox_ldm", ("vqvae2d",)) != "04_bbox_ldm_config3"
    assert run_settings.run_name(vq, "02_vae3d", autoencoders=("vae3d",)) == "02_vae3d"
    # chapter 04's HU window is the VQ-VAE's training window
    window = get_config("smoke", {"bbox_ldm.hu_clip": "-1000,400"})
    assert run_settings.run_name(window, "02_vqvae2d", autoencoders=("vqvae2d",)) == "02_vqvae2d@hu_clip=-1000.0,400.0"
    long = get_config("smoke", {"lung_ddpm.unet_channels": "8,16,32,64,128,256", "lung_ddpm.train_steps": 7,
                                "lung_ddpm.layout_encoding": "scaled", "lung_ddpm.loss": "l1"})
    name = run_settings.run_name(long, "06_lung_ddpm_layout", "lung_ddpm")
    assert name.startswith("06_lung_ddpm_layout@") and len(name) <= len("06_lung_ddpm_layout@") + 51


def test_the_method_faces_and_trainers_use_the_overridden_folder():
    from lungsynth.autoencoders import default_run_dir
    from lungsynth.methods.hr_ldm.method import HrLdmMethod
    from lungsynth.methods.lung_ddpm.method import LungDdpmMethod

    base, over = get_config("smoke"), get_config("smoke", {"lung_ddpm.layout_encoding": "scaled"})
    assert LungDdpmMethod().run_dir(over).name == "06_lung_ddpm_layout@layout_encoding=scaled"
    assert LungDdpmMethod().run_dir(base).name == "06_lung_ddpm_layout"
    assert HrLdmMethod().run_dir(get_config("smoke", {"autoencoders.vae3d_channels": "8,8,8"})).name.startswith(
        "05_hr_ldm_hist@vae3d_channels=")
    assert default_run_dir("vae3d", get_config("smoke", {"autoencoders.perceptual_network": "astra"}),
                           create=False).name == "02_vae3d@perceptual_network=astra"
    assert default_run_dir("vae3d", "smoke", create=False).name == "02_vae3d"


def test_every_try_this_override_is_valid_and_reaches_the_run_it_names():
    suggestions = try_this_overrides()
    keys = {k for _, k, _ in suggestions}
    # the prompts the issue found silently ignored or raising are among those checked
    assert {"data.spacing_3d_mm", "hr_ldm.train_steps", "hr_ldm.hist_weight", "lung_ddpm.train_steps", "autoencoders.perceptual_network",
            "autoencoders.vq_num_embeddings", "lung_ddpm.layout_encoding", "bbox_ldm.hu_clip"} <= keys
    for chapter, key, value in suggestions:
        section, name = key.split(".")
        for profile in ("smoke", "course"):
            cfg = get_config(profile, {key: value})  # a valid key and a value the config accepts
            if key in preparation_settings(cfg):  # chapter 01's voxel size: its own prepared folder
                assert prepared_folder(cfg) != prepared_dir(profile), f"{chapter}: {key} re-prepares the shared data"
            if section not in TRAINED_BY:
                continue  # data (stamped), evaluation and downstream settings: not a trained generator's
            changed = [run_settings.changed_settings(cfg, s, kinds) for s, kinds in TRAINED_BY[section]]
            same = getattr(getattr(cfg, section), name) == getattr(getattr(get_config(profile), section), name)
            if name in run_settings.NOT_TRAINING.get(section, ()) or same:
                assert not any(changed), f"{chapter}: {key}={value!r} moves a {profile} run it does not train"
            else:
                assert any(key in c for c in changed), \
                    f"{chapter}: {key}={value!r} would reuse the profile's trained {profile} run"


def test_a_finished_run_with_other_recorded_settings_is_refused(tmp_path):
    cfg = get_config("smoke")
    wanted = run_settings.training_settings(cfg, "hr_ldm", ("vae3d",))
    run_settings.check_recorded(tmp_path, wanted, "cmd")  # no record: a run from before records, reused
    run_settings.record(tmp_path, {**wanted, "hr_ldm.hist_weight": 3.0})
    with pytest.raises(run_settings.SettingsChanged,
                       match=r"hr_ldm.hist_weight: 3.0 -> 10.0.*Train it again with: cmd"):
        run_settings.check_recorded(tmp_path, wanted, "cmd")
    run_settings.record(tmp_path, {**wanted, "hr_ldm.train_steps": 5})
    run_settings.check_recorded(tmp_path, wanted, "cmd", ignore=("hr_ldm.train_steps",))  # a budget that resumes
    run_settings.record(tmp_path, wanted)
    run_settings.check_recorded(tmp_path, wanted, "cmd")


def test_the_training_loops_settings_shape_a_run_and_old_records_count_as_its_defaults(tmp_path):
    clipped = get_config("smoke", {"engine.grad_clip": 0.5})
    assert run_settings.run_name(clipped, "06_lung_ddpm_layout", "lung_ddpm") == "06_lung_ddpm_layout@grad_clip=0.5"
    logged = get_config("smoke", {"engine.checkpoint_every": 3, "engine.log_every": 1})  # not training settings
    assert run_settings.run_name(logged, "06_lung_ddpm_layout", "lung_ddpm") == "06_lung_ddpm_layout"
    wanted = run_settings.training_settings(get_config("smoke"), "lung_ddpm")
    old = {k: v for k, v in wanted.items() if not k.startswith("engine.")}  # recorded before engine keys were
    run_settings.record(tmp_path, old)
    run_settings.check_recorded(tmp_path, wanted, "cmd")  # the engine's defaults: reused
    with pytest.raises(run_settings.SettingsChanged, match=r"engine.grad_clip: 1.0 -> 0.5"):
        run_settings.check_recorded(tmp_path, run_settings.training_settings(clipped, "lung_ddpm"), "cmd")


def test_architecture_and_target_try_this_overrides_change_the_model_they_name():
    """Chapter 02's codebook, chapter 03's skips and chapter 04's target, applied as the chapters suggest, build
    another model."""
    from lungsynth.autoencoders.model import autoencoder_spec
    from lungsynth.methods.bbox_ldm.train import BboxLdmTask
    from lungsynth.methods.land.model import LandDenoiser, denoiser_spec

    def land_parameters(overrides):
        net = LandDenoiser(denoiser_spec(get_config("smoke", overrides), "mask"))
        return sum(p.numel() for p in net.parameters())

    codebook = autoencoder_spec("vqvae2d", get_config("smoke", {"autoencoders.vq_num_embeddings": 256}))
    assert codebook["num_embeddings"] == 256 != autoencoder_spec("vqvae2d", get_config("smoke"))["num_embeddings"]
    assert land_parameters({"land.skip": "concat"}) > land_parameters({})  # concatenated skips widen the decoder
    base = BboxLdmTask(get_config("smoke"), 3, 4)
    paper = BboxLdmTask(get_config("smoke", {"bbox_ldm.prediction": "epsilon"}), 3, 4)
    assert (base.prediction, paper.prediction) == ("v_prediction", "epsilon")
    assert paper.scheduler.prediction_type == "epsilon"
