"""Prompts written from LIDC radiologist scores (chapter 07, after Urata et al.).

One sentence per nodule from five of the nine LIDC characteristics::

    >>> write_prompt({"sphericity": 4, "texture": 5, "margin": 4, "spiculation": 1, "calcification": 6})
    'The nodule is nearly round in shape, solid internally, with mostly well-defined margins, no spiculation and no calcification.'

Scores are LIDC's integer scales (calcification 1..6, the others 1..5); a median between two
readers (e.g. 3.5) is rounded half up. :func:`parse_prompt` inverts :func:`write_prompt`, which
is how text consistency is checked (attribute recovery) without CLIP weights.
"""

from __future__ import annotations

import math
from typing import Mapping

PROMPT_ATTRIBUTES: tuple[str, ...] = ("sphericity", "texture", "margin", "spiculation", "calcification")

# LIDC scale definitions (LIDC-IDRI annotation guide): 1 = first named extreme, 5 = the other.
SPHERICITY = {1: "linear", 2: "somewhat linear", 3: "ovoid", 4: "nearly round", 5: "round"}
TEXTURE = {1: "ground-glass", 2: "mostly ground-glass", 3: "part-solid", 4: "mostly solid", 5: "solid"}
MARGIN = {1: "poorly defined", 2: "somewhat poorly defined", 3: "moderately defined",
          4: "mostly well-defined", 5: "sharp"}
SPICULATION = {1: "no", 2: "slight", 3: "moderate", 4: "considerable", 5: "marked"}
CALCIFICATION = {1: "popcorn", 2: "laminated", 3: "solid", 4: "non-central", 5: "central", 6: "no"}
PHRASES: dict[str, dict[int, str]] = {"sphericity": SPHERICITY, "texture": TEXTURE, "margin": MARGIN,
                                      "spiculation": SPICULATION, "calcification": CALCIFICATION}


def score_to_level(name: str, value: float) -> int:
    """An LIDC score (possibly a median like 3.5) as an integer level; out-of-range is an error."""
    scale = PHRASES[name]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise ValueError(f"{name} score is missing; prompts need all of {', '.join(PROMPT_ATTRIBUTES)}")
    level = int(math.floor(float(value) + 0.5))
    if level not in scale:
        raise ValueError(f"{name} score {value} outside LIDC's scale {min(scale)}..{max(scale)}")
    return level


def write_prompt(scores: Mapping[str, float]) -> str:
    """The sentence for one nodule's scores (keys: :data:`PROMPT_ATTRIBUTES`)."""
    missing = [a for a in PROMPT_ATTRIBUTES if a not in scores]
    if missing:
        raise ValueError(f"prompt needs scores for {', '.join(missing)}")
    lv = {a: score_to_level(a, scores[a]) for a in PROMPT_ATTRIBUTES}
    return (f"The nodule is {SPHERICITY[lv['sphericity']]} in shape, {TEXTURE[lv['texture']]} internally, "
            f"with {MARGIN[lv['margin']]} margins, {SPICULATION[lv['spiculation']]} spiculation "
            f"and {CALCIFICATION[lv['calcification']]} calcification.")


def parse_prompt(prompt: str) -> dict[str, int]:
    """Recover the integer levels from a sentence written by :func:`write_prompt`."""
    prefix, rest = "The nodule is ", prompt
    if not rest.startswith(prefix) or not rest.endswith(" calcification."):
        raise ValueError(f"not a lungsynth prompt: {prompt!r}")
    rest = rest[len(prefix):-len(" calcification.")]
    shape, rest = rest.split(" in shape, ", 1)
    texture, rest = rest.split(" internally, with ", 1)
    margin, rest = rest.split(" margins, ", 1)
    spic, calc = rest.split(" spiculation and ", 1)
    words = {"sphericity": shape, "texture": texture, "margin": margin, "spiculation": spic, "calcification": calc}
    out = {}
    for name, word in words.items():
        inverse = {v: k for k, v in PHRASES[name].items()}
        if word not in inverse:
            raise ValueError(f"unknown {name} phrase {word!r} in prompt")
        out[name] = inverse[word]
    return out
