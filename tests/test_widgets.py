"""The interactive views: the visual Turing test's bookkeeping and its buttons."""

from __future__ import annotations

import numpy as np
import pytest

from lungsynth.widgets import TuringQuiz, turing_quiz


def _quiz() -> TuringQuiz:
    real = [np.full((8, 8), -800.0 + k) for k in range(3)]
    fake = [np.full((8, 8), 100.0 + k) for k in range(2)]
    return TuringQuiz(real, fake, seed=1)


def test_quiz_shuffles_and_counts_like_a_reader_study():
    quiz = _quiz()
    assert sorted(quiz.truth) == ["real"] * 3 + ["synthetic"] * 2
    assert [("real" if im[0, 0] < 0 else "synthetic") for im in quiz.images] == quiz.truth  # images keep their truth
    assert quiz.truth != ["real"] * 3 + ["synthetic"] * 2  # shuffled (seed 1)
    quiz.answer_all(["real"] * 5)
    table = quiz.confusion()
    assert table.loc["truth: real", "guess: real"] == 3 and table.loc["truth: synthetic", "guess: real"] == 2
    assert table.to_numpy().sum() == 5 and quiz.accuracy() == pytest.approx(0.6)
    with pytest.raises(ValueError, match="a guess is one of"):
        quiz.answer(0, "fake")
    with pytest.raises(ValueError, match="4 answers for 5"):
        quiz.answer_all(["real"] * 4)


def test_quiz_buttons_record_the_guesses_in_order():
    quiz = _quiz()
    box = turing_quiz(quiz)
    buttons = box.children[1].children
    for k in range(len(quiz)):
        buttons[k % 2].click()  # real, synthetic, real, ...
    assert quiz.guesses == ["real", "synthetic", "real", "synthetic", "real"]
    assert all(b.disabled for b in buttons) and "accuracy" in box.children[2].value
