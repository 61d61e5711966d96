"""Chapter 07, evaluate room: honest prompt adherence, the orientation of the references, the nodule's geometry."""

import numpy as np
import pytest
import torch

from lungsynth.methods.text2img import (adherence, balanced_accuracy, best_scale, class_weights, generate,
                                        geometry_misses, geometry_share, nodule_diameter_ratio, oriented)


def test_a_majority_guess_scores_chance_not_the_majority_share():
    """On labels as unequal as LIDC calcification (92% absent), always answering "absent" is right 92% of the time
    but has balanced accuracy 1/2: chance for two levels."""
    wanted = np.array([1] * 92 + [2] * 8)
    majority = np.ones(100, dtype=int)
    assert (majority == wanted).mean() == pytest.approx(0.92)
    result = adherence(wanted, majority, bootstrap=100, seed=0)
    assert result["balanced_accuracy"] == pytest.approx(0.5) == result["chance"]
    assert result["ci"][0] <= 0.5 <= result["ci"][1] and result["levels"] == 2 and result["n"] == 100
    five = np.repeat([1, 2, 3, 4, 5], [5, 5, 10, 20, 60])
    assert balanced_accuracy(five, np.full(100, 5)) == pytest.approx(0.2) == adherence(five, five * 0 + 5, bootstrap=0)["chance"]


def test_a_good_predictor_has_an_interval_above_chance():
    rng = np.random.default_rng(0)
    wanted = rng.integers(1, 3, 200)
    predicted = np.where(rng.random(200) < 0.9, wanted, 3 - wanted)
    result = adherence(wanted, predicted, bootstrap=200, seed=1)
    assert result["balanced_accuracy"] == pytest.approx(0.9, abs=0.05)
    assert result["chance"] < result["ci"][0] <= result["balanced_accuracy"] <= result["ci"][1]


def test_class_weights_make_every_present_level_count_alike():
    w = class_weights([1] * 90 + [2] * 10, 2)
    assert w[1] / w[0] == pytest.approx(9.0) and w.mean() == pytest.approx(1.0)
    w = class_weights([1, 1, 3], 4)  # absent levels weigh nothing
    assert w[1] == 0 and w[3] == 0 and w[0] * 2 == pytest.approx(w[2])


def test_references_take_the_generators_orientations_reproducibly():
    images = torch.arange(2 * 16.0).reshape(2, 1, 4, 4).repeat(8, 1, 1, 1)
    a, b = oriented(images, seed=3), oriented(images, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, oriented(images, seed=4))
    dihedral = {tuple(torch.rot90(images[0], k, (-2, -1)).flip(-1).flatten().tolist()) for k in range(4)}
    dihedral |= {tuple(torch.rot90(images[0], k, (-2, -1)).flatten().tolist()) for k in range(4)}
    assert {tuple(x.flatten().tolist()) for x in a[::2]} <= dihedral and len({tuple(x.flatten().tolist()) for x in a[::2]}) > 2


def _disc(size: int, diameter: float, background: float = 0.1, value: float = 0.6) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    return np.where(np.hypot(yy, xx) <= diameter / 2, value, background).astype(np.float32)


def test_the_nodule_diameter_is_measured_as_a_share_of_the_side():
    assert nodule_diameter_ratio(_disc(64, 32)) == pytest.approx(0.5, abs=0.03)
    assert nodule_diameter_ratio(_disc(64, 16, value=0.25)) == pytest.approx(0.25, abs=0.03)  # faint: its own edge
    assert np.isnan(nodule_diameter_ratio(np.full((64, 64), 0.3)))  # nothing brighter at the centre
    blob = _disc(64, 32)
    blob[:, 60:] = 0.6  # a bright wall away from the nodule does not join it
    assert nodule_diameter_ratio(blob) == pytest.approx(0.5, abs=0.03)
    share, ratios = geometry_share(np.stack([_disc(64, 32), _disc(64, 12), np.full((64, 64), 0.3)]))
    assert share == pytest.approx(1 / 3) and np.isnan(ratios[2])
    miss = geometry_misses(np.append(ratios, nodule_diameter_ratio(_disc(64, 50))))  # right, small, none, large
    assert (miss["none"], miss["small"], miss["large"]) == (0.25, 0.25, 0.25)
    assert miss["median"] == pytest.approx(np.median([0.5, 12 / 64, 50 / 64]), abs=0.03)
    edges = geometry_misses(np.array([0.36, 0.44, 0.5, 0.64, 0.34, 0.66, np.nan, np.nan]))  # 0.5 +- 0.15 is right
    assert (edges["none"], edges["small"], edges["large"], edges["median"]) == (0.25, 0.125, 0.125, 0.47)


def test_the_best_scale_is_the_lowest_kid():
    rows = [{"guidance": "real"}, {"guidance": 5.0, "kid": 0.2}, {"guidance": 10.0, "kid": 0.1}, {"guidance": 20.0, "kid": 0.3}]
    assert best_scale(rows) == 10.0


def test_guidance_must_be_positive(tiny_model):
    with pytest.raises(ValueError, match="expected a scale > 0"):
        generate(tiny_model, ["x"], guidance_scale=0.0, steps=2, device=torch.device("cpu"))


class _Discs(torch.utils.data.Dataset):
    """ROIs of a bright disc spanning half the side (as the prepared ROIs of side 2 x diameter), with scores."""

    def __init__(self, n: int, offset: int = 0) -> None:
        self.n, self.offset = n, offset

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        from lungsynth.data.prompts import write_prompt

        i += self.offset
        scores = {"sphericity": 5, "texture": 1 + 4 * (i % 2), "margin": 4, "spiculation": 1,
                  "calcification": 3 if i % 3 == 0 else 6, "malignancy": 3}
        image = torch.from_numpy(_disc(32, 16, value=0.4 + 0.4 * (i % 2)))[None]
        return {"image": image, "scores": scores, "prompt": write_prompt(scores)}


def test_the_gates_are_judged_against_baselines_of_the_same_run(tiny_model, monkeypatch):
    import importlib

    from lungsynth.config import get_config

    ev = importlib.import_module("lungsynth.methods.text2img.evaluate")
    tr = importlib.import_module("lungsynth.methods.text2img.train")  # the package exports a function "train"

    splits = {"train": _Discs(12), "val": _Discs(6, 100), "test": _Discs(44, 200)}
    monkeypatch.setattr(tr, "roi_dataset", lambda cfg, split: splits[split])
    monkeypatch.setattr(ev, "data_source", lambda cfg: "toy")
    cfg = get_config("smoke", {"data.roi_size": 32, "text2img.sample_steps": 2, "text2img.guidance_scales": (1.0, 5.0),
                               "text2img.n_eval_samples": 4, "text2img.classifier_steps": 3,
                               "evaluation.slice_net_steps": 3, "evaluation.bootstrap": 20})
    tools = ev.evaluation_tools(cfg, tiny_model)
    sweep = ev.guidance_sweep(cfg, tiny_model, progress=False, tools=tools)
    assert [r["guidance"] for r in sweep] == ["real", 1.0, 5.0] and all(r["split"] == "val" for r in sweep)
    monkeypatch.setattr(ev, "guidance_sweep", lambda *a, **k: pytest.fail("swept again"))  # the notebook's rows serve
    rows = {r.name: r for r in ev.measure_gates(cfg, tiny_model, progress=False, sweep=sweep, tools=tools)}
    assert rows["best guidance scale (lowest KID on the validation split)"].value in (1.0, 5.0)
    judged = [r for r in rows.values() if r.status != "info"]
    assert len(judged) == 2 * len(ev.GATED_ATTRIBUTES) + 2 and all(r.status in ("pass", "fail") for r in judged)
    kid = rows["distribution: KID vs 0.1 x the noise baseline"]
    assert kid.n == 22 and kid.baseline > 0
    geometry = rows["geometry: nodule diameter 0.5 +- 0.15 of the ROI side (share)"]
    assert geometry.baseline == 1.0 and geometry.n == 44  # every real disc spans half its ROI
    calc = rows["prompt adherence, calcification: interval low end above chance"]
    assert calc.baseline == 0.5 and calc.threshold == ">= 0.5"
