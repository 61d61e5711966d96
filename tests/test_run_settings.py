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


@pytest.fixture()
def one_thread():
    """Tiny networks: one thread is as fast as two, and does not spin against other work on a shared machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_chapter_05_try_this_overrides_change_the_loss_and_the_inpainting(tmp_path, one_thread):
    """hist_weight weighs the histogram term of the loss a one-step training run logs; anchor_noise_background and
    clip_latent change what inpainting with that run does (background re-noised between steps, x0-hat unclipped)."""
    import csv

    import torch

    from lungsynth.autoencoders import build_autoencoder
    from lungsynth.methods import hr_ldm

    tiny = {"data.crop_size": 16, "hr_ldm.unet_channels": (16, 16), "hr_ldm.attention_levels": (False, True),
            "hr_ldm.num_res_blocks": 1, "hr_ldm.context_dim": 16, "hr_ldm.hist_hidden": 16, "hr_ldm.train_steps": 1,
            "hr_ldm.batch_size": 2, "hr_ldm.n_cache": 0, "autoencoders.vae3d_channels": (8, 16, 16),
            "engine.checkpoint_every": 0, "engine.log_every": 1, "hr_ldm.hist_timestep_weighting": "none"}
    r = (torch.stack(torch.meshgrid(*[torch.arange(16.0) - 7.5] * 3, indexing="ij")) ** 2).sum(0).sqrt()
    nodule = (r <= 3).float()
    crops = [{"ct": (0.1 + 0.5 * nodule)[None], "hrmask": torch.stack([nodule, nodule, 0 * nodule]), "subtype_id": i}
             for i in range(2)]
    torch.manual_seed(0)
    vae = build_autoencoder("vae3d", get_config("smoke", tiny))
    for weight in (1.0, 100.0):  # eq. 9: loss = L_eps + lambda_hist * L_hist, as the run's task computed it
        run = hr_ldm.train(get_config("smoke", {**tiny, "hr_ldm.hist_weight": weight}), True, tmp_path / str(weight),
                           vae=vae, crops=crops, progress=False)
        row = {k: float(v) for k, v in next(csv.DictReader((run / "metrics.csv").open())).items()}
        assert row["loss_hist"] > 0 and row["loss"] == pytest.approx(row["loss_eps"] + weight * row["loss_hist"],
                                                                     rel=1e-5)

    def inpaint(overrides):
        model = hr_ldm.load(get_config("smoke", {**tiny, **overrides}), run, vae=vae, device="cpu")
        z_bg = vae.encode_latent(crops[0]["ct"][None], sample=False)
        cond = hr_ldm.mask_to_latent(crops[0]["hrmask"][None], vae.downsample)
        _, steps = hr_ldm.inpaint_latent(model, z_bg, cond, 0, torch.full((hr_ldm.HIST_BINS,), 1 / hr_ldm.HIST_BINS),
                                         steps=4, intermediates_every=1)
        outside = (cond[:, :1] == 0).expand_as(z_bg)
        pasted = [torch.equal(s["sample"][outside], z_bg[outside]) for s in steps]
        return pasted, max(float(s["pred_x0"].abs().max()) for s in steps)

    pasted, largest = inpaint({})  # smoke: the clean background pasted, x0-hat clipped to [-3, 3]
    assert all(pasted) and largest <= 3.0
    pasted, _ = inpaint({"hr_ldm.anchor_noise_background": True})  # q(z_bg, t-1): noised until the last step
    assert not any(pasted[:-1]) and pasted[-1]
    assert inpaint({"hr_ldm.clip_latent": 0.0})[1] > 3.0


def test_sampler_try_this_overrides_change_the_sampler_they_name(monkeypatch, one_thread):
    """Chapter 06's step count and DDIM reach Lung-DDPM's reverse process; chapter 07's PNDM sampler reaches the
    method's generation and its v-prediction the scheduler the text-to-image model is built with."""
    import torch

    from lungsynth.autoencoders import build_autoencoder
    from lungsynth.data.conditions import Condition
    from lungsynth.data.preprocess import unit_to_hu
    from lungsynth.data.prompts import PROMPT_ATTRIBUTES
    from lungsynth.methods import lung_ddpm, text2img
    from lungsynth.methods.text2img import model as t2i_model
    from lungsynth.methods.text2img.method import Text2ImgMethod

    tiny = {"data.size_ddpm": 4, "lung_ddpm.unet_channels": (4,), "lung_ddpm.attention_at": (),
            "lung_ddpm.num_res_blocks": 1}
    layout = torch.zeros(1, 1, 4, 4, 4)
    layout[..., 1:3, 1:3, 1:3] = 1
    layout[..., 2, 2, 2] = 2

    def ddpm_sample(overrides, **kw):  # the model as lung_ddpm.load builds it, with untrained weights
        cfg = get_config("smoke", {**tiny, **overrides})
        torch.manual_seed(0)
        model = lung_ddpm.LungDDPM(lung_ddpm.build_unet(cfg).eval(), lung_ddpm.build_scheduler(cfg), cfg)
        return model.sample(layout, aas=False, generator=torch.Generator().manual_seed(0), device="cpu", **kw)

    stats = {}
    ddpm_sample({"lung_ddpm.sample_steps": 250}, stats=stats)
    assert stats["steps"] == stats["nfe"] == 250
    ddim = ddpm_sample({"lung_ddpm.sampler": "ddim"}, num_inference_steps=3)
    assert torch.equal(ddim, ddpm_sample({}, num_inference_steps=3, sampler="ddim"))
    assert not torch.equal(ddim, ddpm_sample({}, num_inference_steps=3))  # the smoke default: DDPM

    # chapter 02's KL-VAE, untrained, instead of training one: the codec is not what this test is about
    monkeypatch.setattr(t2i_model, "course_codec",
                        lambda cfg: t2i_model.LatentCodec(build_autoencoder("vae2d", cfg), 1.0))
    small = {"data.roi_size": 16, "text2img.unet_channels": (32, 32)}
    model = text2img.build_model(get_config("smoke", {**small, "text2img.prediction_type": "v_prediction"}))
    assert model.scheduler.config.prediction_type == "v_prediction"
    assert text2img.sample_scheduler("pndm", model.scheduler).config.prediction_type == "v_prediction"
    assert text2img.build_model(get_config("smoke", small)).scheduler.config.prediction_type == "epsilon"
    condition = Condition(0, "heldout", "slice", nodules=[{k: 3.0 for k in PROMPT_ATTRIBUTES}])
    face = Text2ImgMethod().with_options(steps=2)
    pndm_cfg = get_config("smoke", {**small, "text2img.sampler": "pndm"})
    pndm = face.generate(pndm_cfg, model, [condition], seed=0)[0]
    by_hand = unit_to_hu(text2img.generate(model, [pndm["info"]["prompt"]], 5.0, 2, "pndm", seed=0),
                         pndm_cfg.data.hu_min, pndm_cfg.data.hu_max)
    assert torch.equal(torch.from_numpy(pndm["arrays"]["image"]), by_hand[0, 0])
    ddim_image = face.generate(get_config("smoke", small), model, [condition], seed=0)[0]["arrays"]["image"]
    assert not (ddim_image == pndm["arrays"]["image"]).all()  # the smoke default: DDIM
