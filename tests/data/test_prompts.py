import itertools

import pytest

from lungsynth.data.prompts import PHRASES, PROMPT_ATTRIBUTES, parse_prompt, prompt_levels, sentence, write_prompt


# Urata et al., Figure 2: the prompts of three training pairs, verbatim (sphericity, texture, margin, spiculation).
FIGURE_2 = [
    ({"sphericity": 5, "texture": 5, "margin": 5, "spiculation": 1, "calcification": 6},
     "The nodule is round in shape, solid internally, with well-defined margins."),
    ({"sphericity": 4, "texture": 5, "margin": 4, "spiculation": 1, "calcification": 6},
     "The nodule is nearly round in shape, solid internally, with mostly well-defined margins."),
    ({"sphericity": 3, "texture": 5, "margin": 3, "spiculation": 5, "calcification": 6},
     "The nodule is oval in shape, solid internally, with relatively well-defined margins. marked spiculation is seen."),
]


@pytest.mark.parametrize("scores, prompt", FIGURE_2)
def test_the_papers_figure_2_prompts(scores, prompt):
    assert write_prompt(scores) == prompt
    assert parse_prompt(prompt) == prompt_levels(scores)


def test_calcification_is_its_presence():
    base = {"sphericity": 5, "texture": 5, "margin": 5, "spiculation": 2}
    absent = write_prompt({**base, "calcification": 6})
    assert absent == "The nodule is round in shape, solid internally, with well-defined margins. slight spiculation is seen."
    present = {write_prompt({**base, "calcification": c}) for c in range(1, 6)}
    assert present == {absent + " calcification is seen."}
    assert parse_prompt(absent + " calcification is seen.")["calcification"] == 2 and parse_prompt(absent)["calcification"] == 1


def test_every_level_combination_gives_a_distinct_invertible_prompt():
    levels = [sorted(PHRASES[a]) for a in PROMPT_ATTRIBUTES]
    seen = set()
    for combo in itertools.product(*levels):
        wanted = dict(zip(PROMPT_ATTRIBUTES, combo))
        prompt = sentence(wanted)
        assert parse_prompt(prompt) == wanted
        seen.add(prompt)
    assert len(seen) == 5 * 5 * 5 * 5 * 2


def test_medians_round_half_up():
    scores = {"sphericity": 3.5, "texture": 4.5, "margin": 1.0, "spiculation": 2.5, "calcification": 5.5}
    assert parse_prompt(write_prompt(scores)) == {"sphericity": 4, "texture": 5, "margin": 1, "spiculation": 3,
                                                  "calcification": 1}


@pytest.mark.parametrize("bad", [{"sphericity": 0}, {"calcification": 7}, {"texture": float("nan")}])
def test_out_of_scale_scores_are_errors(bad):
    scores = {"sphericity": 3, "texture": 3, "margin": 3, "spiculation": 3, "calcification": 6, **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        write_prompt(scores)


@pytest.mark.parametrize("prompt, match", [
    ("a photo of a cat", "not a lungsynth prompt"),
    ("The nodule is square in shape, solid internally, with well-defined margins.",
     r"unknown sphericity phrase 'square'.*expected one of 'linear'"),
    ("The nodule is round in shape, solid internally, with well-defined margins. huge spiculation is seen.",
     r"unknown spiculation phrase 'huge'"),
    ("The nodule is round in shape, solid internally, with well-defined margins. It is big.", "unexpected text"),
])
def test_prompts_with_unknown_values_say_what_is_expected(prompt, match):
    with pytest.raises(ValueError, match=match):
        parse_prompt(prompt)


def test_missing_score_and_impossible_level():
    with pytest.raises(ValueError, match="margin"):
        write_prompt({"sphericity": 3, "texture": 3, "spiculation": 3, "calcification": 6})
    with pytest.raises(ValueError, match=r"calcification level 3 is not one a prompt can say; expected one of \[1, 2\]"):
        sentence({"sphericity": 3, "texture": 3, "margin": 3, "spiculation": 3, "calcification": 3})
