import pytest

from lungsynth.config import PROFILES, get_config, parse_overrides, profile_table, resolve_profile


def test_profiles_pick_their_tier():
    smoke, course, full = (get_config(p) for p in PROFILES)
    assert smoke.data.size_3d == 64 and course.data.size_3d == 128 and full.data.size_3d == 256
    assert smoke.lung_ddpm.num_train_timesteps == full.lung_ddpm.num_train_timesteps == 250
    assert full.lung_ddpm.lr == 1e-5 and full.land.lr == 1e-5
    assert smoke.profile == "smoke" and full.profile == "full"


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


def test_profile_table_rows():
    rows = profile_table(("data.size_3d",))
    assert rows == [{"setting": "data.size_3d", "smoke": 64, "course": 128, "full": 256}]
