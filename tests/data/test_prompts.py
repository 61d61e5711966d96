import itertools

import pytest

from lungsynth.data.prompts import PHRASES, PROMPT_ATTRIBUTES, parse_prompt, write_prompt


def test_the_papers_example_sentence():
    scores = {"sphericity": 4, "texture": 5, "margin": 4, "spiculation": 1, "calcification": 6}
    assert write_prompt(scores) == ("The nodule is nearly round in shape, solid internally, with mostly "
                                    "well-defined margins, no spiculation and no calcification.")


def test_every_score_combination_gives_a_distinct_invertible_prompt():
    scales = [sorted(PHRASES[a]) for a in PROMPT_ATTRIBUTES]
    seen = set()
    for combo in itertools.product(*scales):
        scores = dict(zip(PROMPT_ATTRIBUTES, combo))
        prompt = write_prompt(scores)
        assert parse_prompt(prompt) == scores
        seen.add(prompt)
    assert len(seen) == 5 * 5 * 5 * 5 * 6


def test_medians_round_half_up():
    scores = {"sphericity": 3.5, "texture": 4.5, "margin": 1.0, "spiculation": 2.5, "calcification": 6}
    assert parse_prompt(write_prompt(scores)) == {"sphericity": 4, "texture": 5, "margin": 1, "spiculation": 3,
                                                  "calcification": 6}


@pytest.mark.parametrize("bad", [{"sphericity": 0}, {"calcification": 7}, {"texture": float("nan")}])
def test_out_of_scale_scores_are_errors(bad):
    scores = {"sphericity": 3, "texture": 3, "margin": 3, "spiculation": 3, "calcification": 6, **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        write_prompt(scores)


def test_missing_score_and_foreign_prompt():
    with pytest.raises(ValueError, match="margin"):
        write_prompt({"sphericity": 3, "texture": 3, "spiculation": 3, "calcification": 6})
    with pytest.raises(ValueError, match="not a lungsynth prompt"):
        parse_prompt("a photo of a cat")
