"""Prompts written from LIDC radiologist scores, in Urata et al.'s phrasing (chapter 07).

The paper extracts sphericity, margin, texture, spiculation and the presence of calcification and
turns them into sentences like those of its Figure 2::

    >>> write_prompt({"sphericity": 4, "texture": 5, "margin": 4, "spiculation": 1, "calcification": 6})
    'The nodule is nearly round in shape, solid internally, with mostly well-defined margins.'
    >>> write_prompt({"sphericity": 3, "texture": 5, "margin": 3, "spiculation": 5, "calcification": 6})
    'The nodule is oval in shape, solid internally, with relatively well-defined margins. marked spiculation is seen.'

(the lower-case "marked" after the full stop is the paper's). A sentence on spiculation appears only when
some is scored (LIDC 2..5) and one on calcification only when it is present (LIDC 1..5; 6 is "absent"):
the paper's examples name neither when there is none. Levels the figure does not show use LIDC's own
wording (sphericity 1 "linear", texture 1 "ground-glass", 3 "part-solid", margin 1 "poorly defined").

Scores are LIDC's integer scales (calcification 1..6, the others 1..5); a median between two readers
(e.g. 3.5) is rounded half up. Prompt *levels* are the integers a prompt can express: 1..5 for four
attributes, 1 (absent) or 2 (present) for calcification. :func:`parse_prompt` inverts
:func:`write_prompt`, which is how prompt adherence is checked (attribute recovery) without CLIP weights.
"""

from __future__ import annotations

import math
from typing import Mapping

PROMPT_ATTRIBUTES: tuple[str, ...] = ("sphericity", "texture", "margin", "spiculation", "calcification")

# Prompt level -> words. Figure 2 of the paper fixes sphericity 3-5 ("oval", "nearly round", "round"),
# texture 5 ("solid"), margin 3-5 ("relatively well-", "mostly well-", "well-defined") and spiculation 5.
SPHERICITY = {1: "linear", 2: "somewhat linear", 3: "oval", 4: "nearly round", 5: "round"}
TEXTURE = {1: "ground-glass", 2: "mostly ground-glass", 3: "part-solid", 4: "mostly solid", 5: "solid"}
MARGIN = {1: "poorly defined", 2: "somewhat poorly defined", 3: "relatively well-defined",
          4: "mostly well-defined", 5: "well-defined"}
SPICULATION = {1: "no", 2: "slight", 3: "moderate", 4: "considerable", 5: "marked"}
CALCIFICATION = {1: "no", 2: "present"}  # presence, as the paper extracts it
PHRASES: dict[str, dict[int, str]] = {"sphericity": SPHERICITY, "texture": TEXTURE, "margin": MARGIN,
                                      "spiculation": SPICULATION, "calcification": CALCIFICATION}
LIDC_SCALES = {"sphericity": (1, 5), "texture": (1, 5), "margin": (1, 5), "spiculation": (1, 5),
               "calcification": (1, 6)}
CALCIFICATION_ABSENT = 6  # LIDC: 1 popcorn, 2 laminated, 3 solid, 4 non-central, 5 central, 6 absent


def score_to_level(name: str, value: float) -> int:
    """An LIDC score (possibly a median like 3.5) as the integer prompt level; out-of-range is an error."""
    if name not in LIDC_SCALES:
        raise ValueError(f"unknown prompt attribute {name!r}; prompts are written from {', '.join(PROMPT_ATTRIBUTES)}")
    low, high = LIDC_SCALES[name]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise ValueError(f"{name} score is missing; prompts need all of {', '.join(PROMPT_ATTRIBUTES)}")
    level = int(math.floor(float(value) + 0.5))
    if not low <= level <= high:
        raise ValueError(f"{name} score {value} outside LIDC's scale {low}..{high}")
    if name == "calcification":
        return 1 if level == CALCIFICATION_ABSENT else 2
    return level


def prompt_levels(scores: Mapping[str, float]) -> dict[str, int]:
    """The prompt level of every attribute of :data:`PROMPT_ATTRIBUTES` from one nodule's LIDC scores."""
    missing = [a for a in PROMPT_ATTRIBUTES if a not in scores]
    if missing:
        raise ValueError(f"prompt needs scores for {', '.join(missing)}")
    return {a: score_to_level(a, scores[a]) for a in PROMPT_ATTRIBUTES}


def sentence(levels: Mapping[str, int]) -> str:
    """The prompt for integer prompt levels (keys: :data:`PROMPT_ATTRIBUTES`)."""
    for name in PROMPT_ATTRIBUTES:
        if levels.get(name) not in PHRASES[name]:
            raise ValueError(f"{name} level {levels.get(name)!r} is not one a prompt can say; expected one of "
                             f"{sorted(PHRASES[name])}")
    text = (f"The nodule is {SPHERICITY[levels['sphericity']]} in shape, {TEXTURE[levels['texture']]} internally, "
            f"with {MARGIN[levels['margin']]} margins.")
    if levels["spiculation"] > 1:
        text += f" {SPICULATION[levels['spiculation']]} spiculation is seen."
    if levels["calcification"] > 1:
        text += " calcification is seen."
    return text


def write_prompt(scores: Mapping[str, float]) -> str:
    """The sentence for one nodule's LIDC scores (keys: :data:`PROMPT_ATTRIBUTES`)."""
    return sentence(prompt_levels(scores))


def _word(name: str, word: str, prompt: str) -> int:
    inverse = {v: k for k, v in PHRASES[name].items()}
    if word not in inverse:
        raise ValueError(f"unknown {name} phrase {word!r} in prompt {prompt!r}; expected one of "
                         f"{', '.join(repr(w) for w in PHRASES[name].values() if w != 'no')}")
    return inverse[word]


def parse_prompt(prompt: str) -> dict[str, int]:
    """The prompt levels of a sentence written by :func:`write_prompt`; anything else is an error that
    shows the expected form."""
    form = ("expected 'The nodule is <sphericity> in shape, <texture> internally, with <margin> margins.' "
            "optionally followed by ' <degree> spiculation is seen.' and ' calcification is seen.'")
    head, sep, tail = prompt.partition(" margins.")
    if not head.startswith("The nodule is ") or not sep or " in shape, " not in head or " internally, with " not in head:
        raise ValueError(f"not a lungsynth prompt: {prompt!r}; {form}")
    shape, rest = head[len("The nodule is "):].split(" in shape, ", 1)
    texture, margin = rest.split(" internally, with ", 1)
    levels = {"sphericity": _word("sphericity", shape, prompt), "texture": _word("texture", texture, prompt),
              "margin": _word("margin", margin, prompt), "spiculation": 1, "calcification": 1}
    if tail.endswith(" calcification is seen."):
        tail, levels["calcification"] = tail[: -len(" calcification is seen.")], 2
    if tail:
        if not (tail.startswith(" ") and tail.endswith(" spiculation is seen.")):
            raise ValueError(f"unexpected text {tail!r} in prompt {prompt!r}; {form}")
        levels["spiculation"] = _word("spiculation", tail[1: -len(" spiculation is seen.")], prompt)
        if levels["spiculation"] == 1:
            raise ValueError(f"prompt {prompt!r} says 'no spiculation is seen'; a prompt without spiculation omits it")
    return levels
