"""Chapter 09: the nearest-neighbour memorisation audit."""

import numpy as np
import pytest

from lungsynth.eval.memorization import audit, nearest_neighbours


@pytest.fixture(scope="module")
def sets():
    rng = np.random.default_rng(0)
    draw = lambda n: rng.normal(size=(n, 12)) * np.linspace(0.5, 3.0, 12)  # noqa: E731
    return {"train": draw(60), "heldout": draw(40), "fresh": draw(40)}


def test_copies_of_training_samples_are_flagged(sets):
    rng = np.random.default_rng(1)
    copies = sets["train"][rng.integers(0, 60, 30)] + rng.normal(0, 1e-3, (30, 12))
    res = audit(copies, sets["train"], sets["heldout"], network="toy")
    assert res.flag_rate == 1.0 and res.memorizes and res.p_value == pytest.approx(1 / 2000)
    assert res.distance_ratio < 0.01
    i, j, d = res.closest_pairs(1)[0]
    np.testing.assert_allclose(copies[i], sets["train"][j], atol=1e-2)
    assert res.summary()["network"] == "toy"


def test_new_real_data_is_not_flagged(sets):
    res = audit(sets["fresh"], sets["train"], sets["heldout"])
    assert not res.memorizes and res.p_value > 0.01
    assert res.flag_rate < 0.2 and 0.6 < res.distance_ratio < 1.6


@pytest.mark.parametrize("n_heldout, n_synthetic", [(20, 40), (20, 200), (2, 20)])
def test_false_alarm_rate_is_at_most_alpha(n_heldout, n_synthetic):
    # a generator that memorises nothing (synthetic, training and held-out drawn alike), 300 runs at
    # alpha = 0.01: the permutation test may declare memorisation in at most alpha plus three binomial standard
    # errors of the runs; the binomial test against rate p it replaces did so in 18-59 % of them
    rng = np.random.default_rng(7)
    runs, alpha = 300, 0.01
    alarms, chance = 0, []
    for k in range(runs):
        draw = lambda n: rng.normal(size=(n, 12))  # noqa: E731
        res = audit(draw(n_synthetic), draw(60), draw(n_heldout), alpha=alpha, seed=k)
        alarms += res.memorizes
        chance.append(res.expected_rate)
    assert alarms / runs <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / runs)
    # the chance flag rate is computed at these N: far above the 5th percentile's 5 % with 2 held-out samples
    expected = {20: (0.07, 0.12), 2: (0.30, 0.40)}[n_heldout]
    assert expected[0] < np.mean(chance) < expected[1]


def test_voxel_space_flags_copies_not_new_volumes():
    rng = np.random.default_rng(2)
    vol = lambda n: rng.normal(size=(n, 1, 12, 12, 12)).astype(np.float32)  # noqa: E731
    train, heldout, fresh = vol(30), vol(25), vol(20)
    copied = audit(train[:20] + 0.01 * vol(20), train, heldout, space="voxel")
    assert copied.memorizes and copied.flag_rate == 1.0
    assert not audit(fresh, train, heldout, space="voxel").memorizes


def test_nearest_neighbours_exact():
    ref = np.array([[0.0, 0.0], [3.0, 4.0]])
    d, j = nearest_neighbours(np.array([[3.0, 3.0], [0.0, 1.0]]), ref)
    np.testing.assert_allclose(d, [1.0, 1.0])
    assert j.tolist() == [1, 0]


def test_bad_input_says_what_is_wrong(sets):
    with pytest.raises(ValueError, match="dimension"):
        audit(sets["fresh"][:, :5], sets["train"], sets["heldout"])
    with pytest.raises(ValueError, match="at least 2"):
        audit(sets["fresh"][:1], sets["train"], sets["heldout"])
    bad = np.zeros((4, 1, 8, 8, 8), np.float32)
    bad[0, 0, 0, 0, 0] = np.nan
    good = np.zeros((4, 1, 8, 8, 8), np.float32)
    with pytest.raises(ValueError, match="NaN"):
        audit(bad, good, good, space="voxel")
    with pytest.warns(UserWarning, match="held-out"):
        audit(sets["fresh"], sets["train"], sets["heldout"][:5])
