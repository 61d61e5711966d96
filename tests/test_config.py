import pytest

from lungsynth.config import CHOICES, PROFILES, get_config, parse_overrides, profile_table, resolve_profile


def test_profiles_pick_their_tier():
    smoke, course, full = (get_config(p) for p in PROFILES)
    assert smoke.data.size_3d == 64 and course.data.size_3d == 128 and full.data.size_3d == 256
    assert smoke.lung_ddpm.num_train_timesteps == full.lung_ddpm.num_train_timesteps == 250
    assert full.lung_ddpm.lr == 1e-5 and full.land.lr == 1e-5
    assert smoke.profile == "smoke" and full.profile == "full"


def test_full_hr_ldm_is_the_papers_settings():
    """HR-LDM Sec. 5: lr 1e-5, batch 1, Adam with polynomial decay, a 1000-step scaled-linear DDPM from 0.0015 to
    0.0195, lambda_hist 10, 40 bins over [-1000, 400] HU, eq. 3's one hidden layer, 1000-step DDPM sampling with
    the background re-anchored at its noise level, eq. 8 unweighted, eq. 5 as printed, 6-30 mm nodules."""
    h = get_config("full").hr_ldm
    assert (h.lr, h.batch_size, h.lr_power) == (1e-5, 1, 1.0)
    assert (h.num_train_timesteps, h.beta_start, h.beta_end) == (1000, 0.0015, 0.0195)
    assert (h.hist_weight, h.hist_bins, tuple(h.hist_range_hu), h.hist_layers) == (10.0, 40, (-1000.0, 400.0), 1)
    assert (h.sampler, h.ddim_steps, h.anchor_noise_background, h.clip_latent) == ("ddpm", 1000, True, 0.0)
    assert h.hist_timestep_weighting == "none" and tuple(h.size_range_mm) == (6.0, 30.0)
    # eq. 5 as printed: the epsilon target, the scan's own latents around the lesion, every lesion voxel alike
    assert (h.prediction, h.train_context, h.nodule_weight) == ("epsilon", "scan", 1.0)


def test_full_text2img_trains_the_papers_objective():
    """Urata et al. §2.3: SD 1.5's noise target, every latent position alike (the course weights the nodule's disk)."""
    t = get_config("full").text2img
    assert (t.prediction_type, t.nodule_weight, t.pretrained_lr) == ("epsilon", 1.0, 1e-6)


def test_profile_from_environment(monkeypatch):
    monkeypatch.setenv("LUNGSYNTH_PROFILE", "course")
    assert get_config().profile == "course"
    assert resolve_profile("full") == "full"  # an explicit profile wins


def test_unknown_profile_lists_valid_ones():
    with pytest.raises(ValueError, match="smoke, course, full"):
        get_config("huge")


def test_overrides_are_typed_and_do_not_leak():
    cfg = get_config("smoke", {"land.train_steps": "7", "seed": 3, "autoencoders.vae3d_channels": "8,16,16",
                               "engine.mixed_precision": "false"})
    assert cfg.land.train_steps == 7 and cfg.seed == 3
    assert cfg.autoencoders.vae3d_channels == (8, 16, 16)
    assert cfg.engine.mixed_precision is False
    assert get_config("smoke").land.train_steps != 7


@pytest.mark.parametrize("key", ["land.no_such_key", "nosection.x", "profile"])
def test_unknown_override_is_an_error(key):
    with pytest.raises(KeyError):
        get_config("smoke", {key: 1})


def test_bad_override_value():
    with pytest.raises(ValueError, match="expected int"):
        get_config("smoke", {"land.train_steps": "many"})
    with pytest.raises(ValueError, match="section.key=value"):
        parse_overrides(["land.train_steps"])
    assert parse_overrides(["a.b=1", "c.d = x"]) == {"a.b": "1", "c.d": "x"}


def test_an_override_value_the_code_cannot_use_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"lung_ddpm.layout_encoding='ordinal'.*allowed: onehot, scaled"):
        get_config("smoke", {"lung_ddpm.layout_encoding": "ordinal"})
    with pytest.raises(ValueError, match=r"allowed: ddim, pndm"):
        get_config("smoke", {"text2img.sampler": "euler"})
    assert get_config("smoke", {"land.sampler": "ddpm"}).land.sampler == "ddpm"


def test_every_profile_value_is_an_allowed_choice():
    for profile in PROFILES:
        cfg = get_config(profile)
        for key, allowed in CHOICES.items():
            section, name = key.split(".")
            assert getattr(getattr(cfg, section), name) in allowed, (profile, key)


def test_the_choices_are_the_values_the_code_reads():
    """Each closed set agrees with the constant of the code that uses the setting (drift fails here)."""
    from lungsynth import engine, runtime
    from lungsynth.diffusion import objectives, schedules
    from lungsynth.methods.bbox_ldm.model import MASK_CONTEXTS
    from lungsynth.methods.land.model import LOSS_WEIGHTINGS, SAMPLERS as LAND_SAMPLERS
    from lungsynth.methods.lung_ddpm.model import ENCODINGS
    from lungsynth.methods.lung_ddpm.sample import SAMPLERS as DDPM_SAMPLERS
    from lungsynth.methods.hr_ldm.train import TRAIN_CONTEXTS
    from lungsynth.methods.text2img.model import PREDICTION_TYPES
    from lungsynth.nn.unets import SKIPS

    same = lambda key, values: set(CHOICES[key]) == set(values)  # noqa: E731
    assert same("engine.precision", runtime.PRECISIONS) and same("lung_ddpm.precision", runtime.PRECISIONS)
    assert all(same(f"{s}.lr_schedule", engine.SCHEDULES) for s in ("autoencoders", "bbox_ldm", "lung_ddpm"))
    assert same("land.schedule", schedules.SCHEDULES) and same("lung_ddpm.schedule", schedules.SCHEDULES)
    assert same("bbox_ldm.prediction", schedules.PREDICTION_TYPES)
    assert same("lung_ddpm.prediction", schedules.PREDICTION_TYPES) and same("hr_ldm.prediction", schedules.PREDICTION_TYPES)
    assert same("hr_ldm.train_context", TRAIN_CONTEXTS)
    assert same("text2img.prediction_type", PREDICTION_TYPES) and same("land.skip", SKIPS)
    assert same("land.loss_weighting", LOSS_WEIGHTINGS) and same("land.sampler", LAND_SAMPLERS)
    assert same("hr_ldm.sampler", schedules.SCHEDULER_KINDS) and same("lung_ddpm.sampler", DDPM_SAMPLERS)
    assert same("bbox_ldm.mask_context", MASK_CONTEXTS) and same("lung_ddpm.layout_encoding", ENCODINGS)
    import torch

    x = torch.ones(2)
    for kind in CHOICES["lung_ddpm.loss"]:  # every loss the setting allows is one the objective computes
        objectives.elementwise_loss(x, x, kind)


def test_profile_table_applies_overrides():
    rows = profile_table(("data.n_scans", "data.size_3d"), {"data.n_scans": 4})
    assert [rows[0][p] for p in PROFILES] == [4] * len(PROFILES)
    assert rows[1] == profile_table(("data.size_3d",))[0]


def test_profile_table_rows():
    rows = profile_table(("data.size_3d",))
    assert rows == [{"setting": "data.size_3d", "smoke": 64, "course": 128, "full": 256}]
