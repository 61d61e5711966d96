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
            "engine.checkpoint_every": 0, "engine.log_every": 1, "hr_ldm.hist_timestep_weighting": "none",
            "hr_ldm.prediction": "epsilon"}  # an untrained net's eps puts x0-hat far past the clip; v does not
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
    model = text2img.build_model(get_config("smoke", small))  # smoke and course train the v target
    assert model.scheduler.config.prediction_type == "v_prediction"
    assert text2img.sample_scheduler("pndm", model.scheduler).config.prediction_type == "v_prediction"
    eps_cfg = get_config("smoke", {**small, "text2img.prediction_type": "epsilon"})
    assert text2img.build_model(eps_cfg).scheduler.config.prediction_type == "epsilon"
    condition = Condition(0, "heldout", "slice", nodules=[{k: 3.0 for k in PROMPT_ATTRIBUTES}])
    face = Text2ImgMethod().with_options(steps=2)
    pndm_cfg = get_config("smoke", {**small, "text2img.sampler": "pndm"})
    pndm = face.generate(pndm_cfg, model, [condition], seed=0)[0]
    by_hand = unit_to_hu(text2img.generate(model, [pndm["info"]["prompt"]], 5.0, 2, "pndm", seed=0),
                         pndm_cfg.data.hu_min, pndm_cfg.data.hu_max)
    assert torch.equal(torch.from_numpy(pndm["arrays"]["image"]), by_hand[0, 0])
    ddim_image = face.generate(get_config("smoke", small), model, [condition], seed=0)[0]["arrays"]["image"]
    assert not (ddim_image == pndm["arrays"]["image"]).all()  # the smoke default: DDIM


def test_chapter_06_training_try_this_overrides_change_the_loss_and_the_training_items(tmp_path, monkeypatch,
                                                                                        one_thread):
    """The paper's epsilon target with L1 is the loss one training step of Lung-DDPM's task takes; nodule_weight 0
    makes it eq. 7's uniform mean; train_patch 0 gives training_dataset whole size_ddpm volumes, not cubes."""
    import torch
    from synth_fakes import make_fake_prepared

    from lungsynth.data import datasets
    from lungsynth.diffusion.schedules import alpha_bar_at
    from lungsynth.methods.lung_ddpm.train import LungDdpmTask, training_dataset

    tiny = {"data.size_ddpm": 4, "lung_ddpm.unet_channels": (4,), "lung_ddpm.attention_at": (),
            "lung_ddpm.num_res_blocks": 1}
    ct = torch.rand(2, 1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    x0 = ct * 2.0 - 1.0  # the DDPM's [-1, 1]
    layout = torch.zeros(2, 1, 4, 4, 4)
    layout[..., 1:3, 1:3, 1:3] = 1
    layout[..., 2, 2, 2] = 2

    def step(overrides):
        """(scheduler's prediction type, loss of one training step, the U-Net's output, the targets of the step's
        noise and timesteps)."""
        task = LungDdpmTask(get_config("smoke", {**tiny, **overrides}))
        seen = {}
        task.unet.register_forward_hook(lambda net, args, out: seen.update(x_t=args[0][:, :1], t=args[1], out=out))
        loss = task.training_step({"ct": ct, "layout": layout}, 0)["loss"].item()
        ab = alpha_bar_at(task.scheduler, seen["t"]).reshape(-1, 1, 1, 1, 1)
        eps = (seen["x_t"] - ab.sqrt() * x0) / (1 - ab).sqrt()  # x_t = sqrt(ab) x0 + sqrt(1 - ab) eps
        targets = {"epsilon": eps, "v_prediction": ab.sqrt() * eps - (1 - ab).sqrt() * x0}
        return task.scheduler.prediction_type, loss, seen["out"].detach(), targets

    def mean(err, weight):  # weighted mean per volume, then over the batch
        return float(((err * weight).flatten(1).sum(1) / weight.flatten(1).sum(1)).mean())

    weights = 1 + get_config("smoke").lung_ddpm.nodule_weight * (layout == 2).float()  # smoke: nodules weigh 21
    prediction, loss, out, target = step({})  # smoke: L2 on v
    assert prediction == "v_prediction" and loss == pytest.approx(mean((out - target[prediction]) ** 2, weights),
                                                                  rel=1e-4)
    prediction, loss, out, target = step({"lung_ddpm.prediction": "epsilon", "lung_ddpm.loss": "l1"})
    assert prediction == "epsilon" and loss == pytest.approx(mean((out - target["epsilon"]).abs(), weights), rel=1e-4)
    _, loss, out, target = step({"lung_ddpm.nodule_weight": 0})
    err = (out - target["v_prediction"]) ** 2
    assert loss == pytest.approx(mean(err, torch.ones_like(err)), rel=1e-4)
    assert loss != pytest.approx(mean(err, weights), rel=1e-3)

    # train_patch: course cuts cubes (smoke trains on whole volumes already); a prepared-format folder of 16^3 scans
    # stands in for the rendered phantoms
    root = make_fake_prepared(tmp_path / "prepared", n_train=2, n_test=1)
    monkeypatch.setattr(datasets, "ensure_prepared", lambda cfg, verbose=True: root)
    course = get_config("course")
    cube, whole = course.lung_ddpm.train_patch, course.data.size_ddpm
    assert 0 < cube < whole
    assert training_dataset(course)[0]["ct"].shape == (1, cube, cube, cube)
    assert training_dataset(get_config("course", {"lung_ddpm.train_patch": 0}))[0]["ct"].shape == (1,) + (whole,) * 3


def test_chapter_02_perceptual_network_try_this_adds_the_perceptual_term(one_thread):
    """With the packaged Astra encoder the autoencoder task builds a perceptual loss and its generator loss holds
    it, weighted by perceptual_weight; smoke's task has none."""
    import torch

    from lungsynth.autoencoders.train import AutoencoderTask
    from lungsynth.nn.losses import AstraPerceptualLoss

    x = torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))

    def step(overrides):
        torch.manual_seed(0)  # the same autoencoder weights either way
        task = AutoencoderTask("vae3d", get_config("smoke", overrides))
        task.setup(torch.device("cpu"))  # as Trainer.fit does before the first step
        torch.manual_seed(1)  # and the same posterior sample
        return task, task.training_step({"image": x}, 0)

    plain, plain_logs = step({})
    assert plain.perceptual is None and "perceptual" not in plain_logs
    astra, logs = step({"autoencoders.perceptual_network": "astra"})
    assert isinstance(astra.perceptual, AstraPerceptualLoss) and float(logs["perceptual"]) > 0
    assert logs["loss_generator"].item() - plain_logs["loss_generator"].item() == pytest.approx(
        astra.perceptual_weight * float(logs["perceptual"]), rel=1e-4)


class _TrainerBuilt(Exception):
    """Raised in place of Trainer.fit: the method built its trainer from the config, and nothing trains."""


def trainer_built_by(monkeypatch, train, *args, **kwargs):
    """The engine Trainer that ``train(*args, **kwargs)`` builds, stopped where its fit would begin."""
    from lungsynth.engine import Trainer

    built = []

    def instead_of_fit(trainer, task, data, val_data=None):
        built.append(trainer)
        raise _TrainerBuilt

    monkeypatch.setattr(Trainer, "fit", instead_of_fit)
    with pytest.raises(_TrainerBuilt):
        train(*args, **kwargs)
    return built[0]


def test_train_longer_try_this_overrides_set_the_trainers_budget(tmp_path, monkeypatch, one_thread):
    """Chapters 02-06's "train longer": the step budget each method's training gives its engine Trainer is the
    override (the autoencoders: train_budget, which train_autoencoder gives its Trainer; Lung-DDPM: make_trainer;
    LAND, the bbox LDM and HR-LDM build theirs inside train(), run here up to the trainer's fit)."""
    import importlib

    import numpy as np
    import torch

    from lungsynth.autoencoders import build_autoencoder
    from lungsynth.autoencoders.train import train_budget
    from lungsynth.methods import bbox_ldm, hr_ldm, land
    from lungsynth.methods.lung_ddpm.train import make_trainer

    assert train_budget("vae3d", get_config("smoke", {"autoencoders.train_steps": 600}))[0] == 600
    assert train_budget("vae3d", get_config("smoke"))[0] != 600
    assert make_trainer(get_config("smoke", {"lung_ddpm.train_steps": 6000}), None).max_steps == 6000

    # LAND reads chapter 02's vae3d and its latent cache of the prepared data first: an untrained vae3d, no items
    land_train = importlib.import_module("lungsynth.methods.land.train")  # land.train is the function
    monkeypatch.setattr(land_train, "training_stamp", lambda cfg: None)
    monkeypatch.setattr(land_train, "build_dataset", lambda *args: [])
    monkeypatch.setattr("lungsynth.autoencoders.ensure_autoencoder",
                        lambda kind, cfg, progress=None: build_autoencoder(kind, cfg))
    trainer = trainer_built_by(monkeypatch, land.train, get_config("smoke", {"land.train_steps": 500}), "mask",
                               tmp_path / "land")
    assert trainer.max_steps == 500

    # the bbox LDM and HR-LDM take in-memory data and an autoencoder
    small = get_config("smoke", {"data.size_2d": 32, "bbox_ldm.unet_channels": (16, 16, 32),
                                 "autoencoders.vqvae2d_channels": (8, 8), "bbox_ldm.train_steps": 1600})
    lungs = np.zeros((2, 32, 32), bool)
    lungs[:, 8:24, 4:28] = True
    slices = {"images": torch.rand(2, 1, 32, 32), "boxes": np.array([[10, 10, 4]] * 2), "lungs": lungs,
              "attributes": np.full((2, 5), 3)}
    trainer = trainer_built_by(monkeypatch, bbox_ldm.train, small, 1, tmp_path / "bbox", data=slices,
                               ae=build_autoencoder("vqvae2d", small).eval(), progress=False)
    assert trainer.max_steps == 1600

    small = get_config("smoke", {"data.crop_size": 16, "hr_ldm.unet_channels": (16, 16), "hr_ldm.num_res_blocks": 1,
                                 "hr_ldm.attention_levels": (False, True), "hr_ldm.context_dim": 16,
                                 "hr_ldm.hist_hidden": 16, "hr_ldm.n_cache": 0,
                                 "autoencoders.vae3d_channels": (8, 16, 16), "hr_ldm.train_steps": 400})
    nodule = torch.zeros(16, 16, 16)
    nodule[6:10, 6:10, 6:10] = 1
    crops = [{"ct": (0.1 + 0.5 * nodule)[None], "hrmask": torch.stack([nodule, nodule, 0 * nodule]), "subtype_id": 0}]
    trainer = trainer_built_by(monkeypatch, hr_ldm.train, small, True, tmp_path / "hr",
                               vae=build_autoencoder("vae3d", small), crops=crops, progress=False)
    assert trainer.max_steps == 400


def test_evaluation_downstream_and_profile_try_this_overrides_change_what_is_planned(tmp_path):
    """Chapter 09's sample counts are what the leaderboard asks of each method (by unit), chapters 10-11's runs and
    steps what their experiments plan, and chapter 00's n_scans what profile_table shows in every profile."""
    import importlib

    from lungsynth.config import profile_table
    from lungsynth.downstream.classification import run_fold
    from lungsynth.downstream.common import seeds
    from lungsynth.downstream.segmentation import steps_for
    from lungsynth.leaderboard import sample_count
    from lungsynth.sampling.registry import FACES

    faces = [getattr(importlib.import_module(module), name)() for module, name in FACES]
    board = get_config("smoke", {"evaluation.n_samples": 64, "evaluation.n_samples_2d": 512})
    asked = {face.name: sample_count(board, face, tmp_path) for face in faces}
    assert asked == {"land": 64, "bbox_ldm": 512, "hr_ldm": 64, "lung_ddpm": 64, "text2img": 512}
    assert all(sample_count(get_config("smoke"), face, tmp_path) < asked[face.name] for face in faces)

    for profile in ("smoke", "course"):
        seg = get_config(profile, {"downstream.seg_steps": 100, "downstream.n_runs": 3})
        assert seeds(seg) == [0, 1, 2] != seeds(get_config(profile))
        assert [steps_for(seg, s) for s in seg.downstream.seg_settings] == [100] * len(seg.downstream.seg_settings)
        cls = get_config(profile, {"downstream.n_runs": 5})
        assert len({run_fold(cls, seed) for seed in seeds(cls)}) == 5  # five runs, each its own validation split

    rows = {r["setting"]: r for r in profile_table(overrides={"data.n_scans": 4})}
    assert rows["data.n_scans"] == {"setting": "data.n_scans", "smoke": 4, "course": 4, "full": 4}
    profiles = {r["setting"]: r for r in profile_table()}
    assert profiles["data.n_scans"]["smoke"] != 4
    assert {k: r for k, r in rows.items() if k != "data.n_scans"} == \
        {k: r for k, r in profiles.items() if k != "data.n_scans"}
