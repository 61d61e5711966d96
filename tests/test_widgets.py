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


def _volume_with_a_nodule():
    vol = np.full((20, 16, 16), -800.0, dtype=np.float32)
    lung = np.zeros(vol.shape, bool)
    lung[2:18, 2:14, 2:14] = True
    nodule = np.zeros(vol.shape, bool)
    nodule[13:16, 5:8, 9:11] = True  # most voxels on axial 13-15, coronal 5-7, sagittal 9-10
    nodule[14, 6, 9] = True
    vol[nodule] = 50.0
    return vol, lung, nodule


def test_slice_browser_opens_on_the_nodule_and_keeps_its_natural_width():
    from lungsynth.widgets import slice_browser

    vol, lung, nodule = _volume_with_a_nodule()
    nodule[14, 4, 9] = True  # axial 14 now holds the most nodule voxels
    box = slice_browser(vol, {"lung": lung, "nodules": nodule}, size=4.0)  # the lung first, as chapter 01 passes it
    pick, slider, image = box.children
    assert slider.value == 14 and image.layout.width == "320px"
    first = image.value
    slider.value = 3
    assert image.value != first  # moving the slider redraws
    pick.value = 2  # sagittal: the busiest sagittal slice of the nodule
    assert slider.value == int(np.argmax(nodule.sum(axis=(0, 1)))) and slider.max == 15
    assert slice_browser(vol, {"lung": lung}, width=500).children[2].layout.width == "500px"
    assert slice_browser(vol, {"lung": lung, "nodules": nodule}, focus="lung").children[1].value == \
        int(np.argmax(lung.sum(axis=(1, 2))))


def test_view_masks_of_another_shape_or_not_binary_are_errors():
    from lungsynth.widgets import slice_browser

    vol, lung, _ = _volume_with_a_nodule()
    with pytest.raises(ValueError, match=r"shape \(20, 16, 15\) but the volume has \(20, 16, 16\)"):
        slice_browser(vol, {"lung": lung[..., :15]})
    with pytest.raises(ValueError, match="not binary \\(values 0, 1, 2\\)"):
        slice_browser(vol, {"label": lung.astype(np.int16) * 2 - (lung & (np.indices(lung.shape)[0] > 9))})
    with pytest.raises(KeyError, match="not one of the masks"):
        slice_browser(vol, {"lung": lung}, focus="nodules")


def test_niivue_view_shows_the_render_and_centres_on_the_largest_nodule(tmp_path):
    import ipyniivue

    from lungsynth.data.preprocess import save_nifti
    from lungsynth.widgets import niivue_view

    vol, _, nodule = _volume_with_a_nodule()
    small = np.zeros_like(nodule)
    small[3, 12, 3] = True  # a one-voxel component that must not win
    s = 2.0  # the project's affine: voxel (d, h, w) -> RAS mm with every axis flipped and d -> z
    affine = np.array([[0, 0, -s, 0], [0, -s, 0, 0], [-s, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
    save_nifti(tmp_path / "ct.nii.gz", vol, affine)
    save_nifti(tmp_path / "label.nii.gz", (nodule | small).astype(np.uint8), affine)
    nv = niivue_view(tmp_path / "ct.nii.gz", {"nodules": tmp_path / "label.nii.gz"})
    assert nv.opts.multiplanar_show_render == ipyniivue.ShowRender.ALWAYS
    assert nv.opts.slice_type == ipyniivue.SliceType.MULTIPLANAR and len(nv.volumes) == 2
    centre = np.argwhere(nodule).mean(axis=0)  # (d, h, w); RAS x <- w, y <- h, z <- d, each flipped
    expected = [1 - (centre[2] + 0.5) / 16, 1 - (centre[1] + 0.5) / 16, 1 - (centre[0] + 0.5) / 20]
    assert np.allclose(nv.scene.crosshair_pos, expected, atol=0.02)
