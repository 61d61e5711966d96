"""The chapters' default synthetic dataset is sized for the largest synthetic ratio (chapter 10 once asked
for 30 synthetic volumes of a pool of 16 and stopped)."""

from __future__ import annotations

import pandas as pd
import pytest
from synth_fakes import NoisyCopy, stamp_generator

from lungsynth.config import get_config
from lungsynth.downstream.common import balancing_deficits, ensure_synthetic, synthetic_needed
from lungsynth.downstream.data import real_items, synthetic_items
from lungsynth.downstream.mixing import balance_classes, mix_ratio


def _cfg(tiny: dict, ratios: str, n_synthetic: int):
    return get_config("smoke", {**tiny, "downstream.synthetic_ratios": ratios,
                                "downstream.n_synthetic": n_synthetic})


def test_synthetic_needed_is_the_largest_ratio_of_the_training_items(tiny, real_root):
    assert synthetic_needed(_cfg(tiny, "0,0.5", 2), "volume", real_root) == 4  # 8 training scans
    assert synthetic_needed(_cfg(tiny, "0,0.5,1", 2), "nodule", real_root) == 8  # one nodule each
    assert synthetic_needed(_cfg(tiny, "0", 2), "volume", real_root) == 0


def _ensure(cfg, real_root, tmp_path, unit):
    gen = stamp_generator(tmp_path / "generator", real_root)
    return ensure_synthetic(cfg, NoisyCopy("volume"), out=tmp_path / "syn", unit=unit, real_root=real_root,
                            checkpoint=gen, model="model")


def test_default_pool_covers_the_largest_ratio(tiny, real_root, tmp_path):
    cfg = _cfg(tiny, "0,0.5,1", 3)  # n_synthetic 3 < the 8 volumes ratio 1 draws
    out = _ensure(cfg, real_root, tmp_path, "volume")
    pool = synthetic_items(out, "volume", real_root)
    assert len(pool) == 8
    train = pd.DataFrame({"item_id": [f"r{i}" for i in range(8)], "synthetic": False})
    assert len(mix_ratio(train, pool, 1.0, 0, allow_repeats=False)) == 16


def test_nodule_pool_is_extended_until_it_holds_enough_rows(tiny, real_root, tmp_path):
    cfg = _cfg(tiny, "0,1", 3)  # 3 volumes hold 3 nodule rows; ratio 1 needs 8
    out = _ensure(cfg, real_root, tmp_path, "nodule")
    assert len(synthetic_items(out, "nodule", real_root)) >= 8
    assert len(synthetic_items(out, "volume", real_root)) == 8  # extended by the measured deficit, not doubled


def test_n_synthetic_is_a_floor(tiny, real_root, tmp_path):
    out = _ensure(_cfg(tiny, "0", 5), real_root, tmp_path, "volume")
    assert len(synthetic_items(out, "volume", real_root)) == 5


def test_repeats_allowed_keeps_the_small_pool(tiny, real_root, tmp_path):
    cfg = get_config("smoke", {**tiny, "downstream.synthetic_ratios": "0,1", "downstream.n_synthetic": 3,
                               "downstream.allow_repeats": True})
    out = _ensure(cfg, real_root, tmp_path, "volume")
    assert len(synthetic_items(out, "volume", real_root)) == 3


def test_each_chapter_asks_its_papers_generator_by_default(tiny, real_root, tmp_path, monkeypatch):
    """Chapter 10 (volumes) segments Lung-DDPM's volumes, chapter 11 (nodules) classifies HR-LDM's nodules, generated
    to the subtype deficits of the real training nodules."""
    import lungsynth.sampling.synth as synth

    asked = []
    monkeypatch.setattr(synth, "synthesize", lambda cfg, method, n, **options: asked.append((method, options["out"])))
    cfg = _cfg(tiny, "0", 1)
    for unit in ("volume", "nodule"):
        ensure_synthetic(cfg, n=1, unit=unit, real_root=real_root)
    assert [m.name for m, _ in asked] == ["lung_ddpm", "hr_ldm"]
    assert [out.name for _, out in asked] == ["downstream_lung_ddpm", "downstream_hr_ldm"]
    deficits = balancing_deficits(real_items(real_root, "nodule", ("train",)))
    assert asked[1][0].options.get("subtype_counts") == (deficits if sum(deficits) else None)
    assert "subtype_counts" not in asked[0][0].options
    with pytest.raises(ValueError, match="volume or nodule"):
        ensure_synthetic(cfg, n=1, unit="slice", real_root=real_root)
    # the deficits count the nodules chapter 11 reads: train 7, 12, 25, 8, 15, 9, 22, 11 mm (solid x5, part-solid,
    # ground-glass x2); within 8-20 mm solid 12, 8, 15, part-solid 9, ground-glass 11
    narrow = get_config("smoke", {**tiny, "downstream.cls_size_range_mm": "8,20"})
    ensure_synthetic(narrow, n=1, unit="nodule", real_root=real_root)
    assert asked[-1][0].options["subtype_counts"] == (0, 2, 2)


def test_volumes_take_the_cohort_layouts_and_nodules_the_training_scans(tiny, real_root, monkeypatch):
    """With a separate cohort (course, full) chapter 10's volumes are generated from the validation patients'
    layouts, in a folder of their own; chapter 11's nodules are still inpainted into training scans."""
    import lungsynth.sampling.synth as synth

    asked = []
    monkeypatch.setattr(synth, "synthesize", lambda cfg, method, n, **o: asked.append((o["conditions"], o["out"].name)))
    cohort = get_config("smoke", {**tiny, "downstream.seg_condition_source": "validation"})
    for unit in ("volume", "nodule"):
        ensure_synthetic(cohort, n=1, unit=unit, real_root=real_root)
    ensure_synthetic(get_config("smoke", tiny), n=1, unit="volume", real_root=real_root)
    assert asked == [("validation", "downstream_lung_ddpm_validation"), ("sampler", "downstream_hr_ldm"),
                     ("sampler", "downstream_lung_ddpm")]
    with pytest.raises(ValueError, match="allowed: sampler, validation"):  # refused when the override is applied
        get_config("smoke", {**tiny, "downstream.seg_condition_source": "heldout"})
    bad = get_config("smoke", tiny)
    bad.downstream.seg_condition_source = "heldout"  # set past the config's check
    with pytest.raises(ValueError, match="use validation"):
        ensure_synthetic(bad, n=1, real_root=real_root)


def test_a_pool_generated_to_the_deficits_balances_the_classes():
    from lungsynth.sampling.registry import get_method

    real = pd.DataFrame({"subtype_id": [0] * 7 + [1] * 3 + [2] * 1, "synthetic": False})
    deficits = balancing_deficits(real)
    assert deficits == (0, 4, 6)
    plan = get_method("hr_ldm").with_options(subtype_counts=deficits).subtype_plan()
    assert sorted(plan.tolist()) == [1] * 4 + [2] * 6
    assert set(plan[:3].tolist()) == {1, 2}  # shuffled: a first part of the pool holds both minority classes
    pool = pd.DataFrame({"subtype_id": plan, "synthetic": True})
    balanced, report = balance_classes(real, pool, "subtype_id", 0, (0, 1, 2), allow_repeats=False)
    assert balanced["subtype_id"].value_counts().to_dict() == {0: 7, 1: 7, 2: 7}
    assert "subtype_counts" not in get_method("hr_ldm").options  # the registered face is unchanged
    with pytest.raises(ValueError, match="three counts"):
        get_method("hr_ldm").with_options(subtype_counts=(0, 0, 0)).subtype_plan()


def test_a_volume_pool_for_the_crop_setting_holds_enough_nodules(tiny, real_root, tmp_path, monkeypatch):
    """Chapter 10's crops draw ratio x the real training *nodules* from the synthetic volumes, which can hold fewer
    nodules each than a training scan (course: 188 in 60 validation-layout volumes against 251 needed)."""
    import lungsynth.downstream.common as common

    monkeypatch.setattr(common, "synthetic_needed", lambda cfg, unit, root: {"volume": 3, "nodule": 6}[unit])
    crops = get_config("smoke", {**tiny, "downstream.seg_settings": "crop", "downstream.n_synthetic": 1})
    out = _ensure(crops, real_root, tmp_path / "crops", "volume")
    assert len(synthetic_items(out, "nodule", real_root)) >= 6  # one nodule a volume here: six volumes
    whole = get_config("smoke", {**tiny, "downstream.seg_settings": "volume", "downstream.n_synthetic": 1})
    out = _ensure(whole, real_root, tmp_path / "whole", "volume")
    assert len(synthetic_items(out, "volume", real_root)) == 3  # the volume setting needs volumes only
