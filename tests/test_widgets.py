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


def test_rating_study_summarises_like_table_2():
    from scipy.stats import mannwhitneyu

    from lungsynth.widgets import RatingQuiz

    real = [np.full((8, 8), -800.0 + k) for k in range(4)]
    fake = [np.full((8, 8), 100.0 + k) for k in range(3)]
    quiz = RatingQuiz(real, fake, ["r"] * 4, ["g"] * 3, items=("realism", "texture"), seed=2)
    assert sorted(quiz.truth) == ["generated"] * 3 + ["real"] * 4
    assert all((im[0, 0] < 0) == (t == "real") and (p == "r") == (t == "real")
               for im, t, p in zip(quiz.images, quiz.truth, quiz.prompts))
    sheet = [{"realism": 5 if t == "real" else 1 + k % 2, "texture": 3} for k, t in enumerate(quiz.truth)]
    table = quiz.rate_all(sheet).summary()
    gen = [s["realism"] for s, t in zip(sheet, quiz.truth) if t == "generated"]
    assert table.loc["realism", "real"] == "5.00 ± 0.00"
    assert table.loc["realism", "generated"] == f"{np.mean(gen):.2f} ± {np.std(gen, ddof=1):.2f}"
    assert table.loc["realism", "Mann-Whitney p"] == pytest.approx(
        mannwhitneyu([5] * 4, gen, alternative="two-sided").pvalue)
    assert table.loc["texture", "Mann-Whitney p"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="missing \\['texture'\\]"):
        quiz.rate(0, {"realism": 3})
    with pytest.raises(ValueError, match="invalid \\{'texture': 6\\}"):
        quiz.rate(0, {"realism": 3, "texture": 6})
    assert quiz.demo_sheet(0) == quiz.demo_sheet(0) and len(quiz.demo_sheet(0)) == 7


def test_rating_widget_records_the_sliders():
    from lungsynth.widgets import RatingQuiz, rating_quiz

    quiz = RatingQuiz([np.zeros((8, 8))], [np.ones((8, 8))], items=("realism",), seed=0)
    box = rating_quiz(quiz)
    slider, button = box.children[2], box.children[3]
    slider.value = 4
    button.click()
    slider.value = 2
    button.click()
    assert quiz.ratings == [{"realism": 4}, {"realism": 2}] and button.disabled
