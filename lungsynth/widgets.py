"""Interactive views for the notebooks (ipywidgets), safe in headless runs.

The widgets draw with matplotlib's Agg backend into an ``ipywidgets.Image``, so the first
frame is stored in the notebook even when nothing renders the widget (papermill, nbval);
when ipywidgets is missing they fall back to a static figure.
"""

from __future__ import annotations

import io
from typing import Any, Mapping

import numpy as np


def _png(image: np.ndarray, masks: Mapping[str, np.ndarray], window: tuple[float, float] | None,
         title: str, size: float) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lungsynth.viz import overlay

    fig = Figure(figsize=(size, size))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 0.93))
    overlay(ax, image, masks, window=window)
    ax.set_title(title, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()


PNG_DPI = 80  # _png's resolution: a view of ``size`` inches is size x 80 pixels wide
NODULE_WORDS = ("nodul", "lesion", "label")  # mask names a view opens on when no ``focus`` is given


def checked_masks(shape: tuple[int, ...], masks: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
    """Each mask as a boolean array of ``shape``; a mask of another shape, or with values other than 0 and 1, is
    an error naming both shapes or the values found."""
    from lungsynth.viz import to_numpy

    out: dict[str, np.ndarray] = {}
    for name, mask in (masks or {}).items():
        arr = to_numpy(mask)
        if arr.shape != tuple(shape):
            raise ValueError(f"mask {name!r} has shape {arr.shape} but the volume has {tuple(shape)}: "
                             "pass masks on the volume's grid")
        values = np.unique(arr)
        if not np.isin(values, (0, 1)).all():
            shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if len(values) > 6 else "")
            raise ValueError(f"mask {name!r} is not binary (values {shown}): pass e.g. label > 0 or label == k")
        out[name] = arr.astype(bool)
    return out


def focus_mask(masks: Mapping[str, Any], focus: str | None = None) -> str | None:
    """The mask a view opens on: ``focus`` if given, else the first whose name says nodule / lesion / label,
    else the first mask (None without masks)."""
    if focus is not None:
        if focus not in masks:
            raise KeyError(f"focus {focus!r} is not one of the masks {sorted(masks)}")
        return focus
    named = [k for k in masks if any(word in k.lower() for word in NODULE_WORDS)]
    return (named or list(masks) or [None])[0]


def busiest_slice(mask: np.ndarray, axis: int) -> int | None:
    """The index along ``axis`` of the slice with the most mask voxels (None for an empty mask)."""
    counts = mask.sum(axis=tuple(a for a in range(mask.ndim) if a != axis))
    return int(np.argmax(counts)) if counts.any() else None


def slice_browser(volume: Any, masks: Mapping[str, Any] | None = None, axis: int = 0,
                  window: tuple[float, float] | None = None, size: float = 4.0, index: int | None = None,
                  focus: str | None = None, width: int | None = None) -> Any:
    """A slider over the slices of ``volume`` [D, H, W] along ``axis`` with mask contours ([D, H, W], binary).

    It opens on ``index``, else on the slice with the most voxels of the ``focus`` mask (default: the mask named
    like a nodule, see ``focus_mask``), else in the middle; changing the axis keeps that rule. The image is shown
    at ``width`` pixels (default its natural ``size`` x 80), so the slider and the whole image fit on a screen.
    A second control moves through the axes (0 axial, 1 coronal, 2 sagittal). Returns the widget (display it as a
    cell's last expression), or a static figure without ipywidgets.
    """
    from lungsynth.viz import show_slices, to_numpy

    vol = to_numpy(volume)
    ms = checked_masks(vol.shape, masks)
    try:
        import ipywidgets as w
    except ImportError:
        return show_slices(vol, ms, axis=axis, window=window)
    key = focus_mask(ms, focus)

    def opening(a: int) -> int:
        best = busiest_slice(ms[key], a) if key is not None else None
        return vol.shape[a] // 2 if best is None else best

    px = int(width or round(size * PNG_DPI))
    view = w.Image(format="png", layout=w.Layout(width=f"{px}px", height="auto"))
    pos = w.IntSlider(value=opening(axis) if index is None else int(index), min=0, max=vol.shape[axis] - 1,
                      description="slice", continuous_update=False, layout=w.Layout(width=f"{max(px, 300)}px"))
    ax_pick = w.ToggleButtons(options=[("axial", 0), ("coronal", 1), ("sagittal", 2)], value=axis)

    def draw(*_: Any) -> None:
        a, i = ax_pick.value, min(pos.value, vol.shape[ax_pick.value] - 1)
        view.value = _png(np.take(vol, i, axis=a), {k: np.take(m, i, axis=a) for k, m in ms.items()},
                          window, f"{['axial', 'coronal', 'sagittal'][a]} {i}/{vol.shape[a] - 1}", size)

    def on_axis(change: Any) -> None:
        pos.max = vol.shape[change["new"]] - 1
        pos.value = opening(change["new"])
        draw()

    pos.observe(draw, names="value")
    ax_pick.observe(on_axis, names="value")
    draw()
    return w.VBox([ax_pick, pos, view], layout=w.Layout(width="fit-content"))


def largest_component_fraction(mask_path: Any) -> list[float] | None:
    """The centre of the largest connected component of a NIfTI mask as NiiVue's crosshair position: fractions
    (0-1) of the volume along its RAS-oriented axes (NiiVue reorients every volume to RAS). None if empty."""
    import nibabel as nib
    from scipy import ndimage

    img = nib.load(str(mask_path))
    mask = np.asarray(img.dataobj) > 0
    labels, n = ndimage.label(mask)
    if n == 0:
        return None
    largest = 1 + int(np.argmax(ndimage.sum_labels(mask, labels, range(1, n + 1))))
    centre = np.array(ndimage.center_of_mass(labels == largest))
    frac = [0.5, 0.5, 0.5]
    for axis, (ras_axis, flip) in enumerate(nib.orientations.io_orientation(img.affine)):
        f = (centre[axis] + 0.5) / mask.shape[axis]
        frac[int(ras_axis)] = float(f if flip > 0 else 1.0 - f)
    return frac


def niivue_view(ct_path: Any, mask_paths: Mapping[str, Any] | None = None, window: tuple[float, float] = (-1000, 400),
                height: int = 480, focus: str | None = None) -> Any:
    """An ipyniivue view of a NIfTI CT with mask overlays (NIfTI paths; offline: ipyniivue bundles NiiVue).

    Three planes and the 3D render in one canvas of ``height`` pixels, the crosshair on the largest component of
    the ``focus`` mask (default: the mask named like a nodule, see ``focus_mask``) and drawn in green with a gap
    there, so the overlays (red, green, ...) stay visible.
    """
    import ipyniivue

    nv = ipyniivue.NiiVue(height=height)
    nv.opts.slice_type = ipyniivue.SliceType.MULTIPLANAR
    nv.opts.multiplanar_show_render = ipyniivue.ShowRender.ALWAYS
    # a green crosshair with a gap: the default red one, drawn through the nodule, hides a red overlay a few voxels wide
    nv.opts.crosshair_color = (0.0, 1.0, 0.0, 1.0)
    nv.opts.crosshair_gap = 8.0
    vols = [{"path": str(ct_path), "colormap": "gray", "cal_min": window[0], "cal_max": window[1]}]
    cmaps = ["red", "green", "blue", "warm"]
    for n, (name, p) in enumerate((mask_paths or {}).items()):
        # saturated from 0.5 up: NiiVue interpolates overlays, and a nodule 2-3 voxels across is otherwise a dim dot
        vols.append({"path": str(p), "colormap": cmaps[n % len(cmaps)], "opacity": 1.0, "cal_min": 0.1,
                     "cal_max": 0.5})
    nv.load_volumes(vols)
    key = focus_mask(dict(mask_paths or {}), focus)
    if key is not None and (frac := largest_component_fraction(mask_paths[key])) is not None:
        nv.scene.crosshair_pos = frac
    return nv


# --------------------------------------------------------------------------- a visual Turing test

QUIZ_LABELS = ("real", "synthetic")


class TuringQuiz:
    """Shuffled real and synthetic images, the learner's guesses, and the confusion matrix a reader study prints
    (rows: the truth, columns: the guess, as HR-LDM's Table 2).

    ``images[i]`` [H, W] is shown i-th; ``truth[i]`` is "real" or "synthetic"; ``guesses[i]`` is None until answered.
    """

    def __init__(self, real: Any, synthetic: Any, seed: int = 0) -> None:
        real, synthetic = [np.asarray(x) for x in real], [np.asarray(x) for x in synthetic]
        if not real or not synthetic:
            raise ValueError("a Turing test needs at least one real and one synthetic image")
        order = np.random.default_rng(seed).permutation(len(real) + len(synthetic))
        pool = [(x, "real") for x in real] + [(x, "synthetic") for x in synthetic]
        self.images = [pool[i][0] for i in order]
        self.truth = [pool[i][1] for i in order]
        self.guesses: list[str | None] = [None] * len(self.images)

    def __len__(self) -> int:
        return len(self.images)

    def answer(self, index: int, guess: str) -> None:
        if guess not in QUIZ_LABELS:
            raise ValueError(f"a guess is one of {QUIZ_LABELS}, got {guess!r}")
        self.guesses[int(index)] = guess

    def answer_all(self, guesses: Any) -> "TuringQuiz":
        """Record a whole answer sheet (one guess per image, in the shown order)."""
        guesses = list(guesses)
        if len(guesses) != len(self):
            raise ValueError(f"{len(guesses)} answers for {len(self)} images")
        for i, g in enumerate(guesses):
            self.answer(i, g)
        return self

    def confusion(self) -> Any:
        """2 x 2 counts of the answered images: index the truth, columns the guess."""
        import pandas as pd

        table = pd.DataFrame(0, index=[f"truth: {t}" for t in QUIZ_LABELS], columns=[f"guess: {g}" for g in QUIZ_LABELS])
        for t, g in zip(self.truth, self.guesses):
            if g is not None:
                table.loc[f"truth: {t}", f"guess: {g}"] += 1
        return table

    def accuracy(self) -> float:
        answered = [(t, g) for t, g in zip(self.truth, self.guesses) if g is not None]
        return float(np.mean([t == g for t, g in answered])) if answered else float("nan")


def turing_quiz(quiz: TuringQuiz, window: tuple[float, float] | None = (-1000.0, 400.0), size: float = 3.0) -> Any:
    """One image at a time with "real" / "synthetic" buttons; after the last, the confusion matrix. Returns the
    widget (display it as a cell's last expression), or None without ipywidgets (answer with ``quiz.answer``)."""
    try:
        import ipywidgets as w
    except ImportError:
        return None
    state = {"i": 0}
    image = w.Image(format="png")
    status = w.HTML()
    out = w.Output()
    buttons = [w.Button(description=label) for label in QUIZ_LABELS]

    def show() -> None:
        i = state["i"]
        if i < len(quiz):
            image.value = _png(quiz.images[i], {}, window, f"image {i + 1} of {len(quiz)}", size)
            status.value = "real or synthetic?"
            return
        for b in buttons:
            b.disabled = True
        status.value = f"done: accuracy {quiz.accuracy():.0%} (chance 50%)"
        with out:
            print(quiz.confusion())

    def on_click(button: Any) -> None:
        quiz.answer(state["i"], button.description)
        state["i"] += 1
        show()

    for b in buttons:
        b.on_click(on_click)
    show()
    return w.VBox([image, w.HBox(buttons), status, out])


# --------------------------------------------------------------------------- a rating study (Urata et al.'s Table 2)

RATING_ITEMS = ("realism", "malignancy", "sphericity", "texture", "margin", "spiculation", "lobulation")  # Table 2
RATING_SCALE = (1, 2, 3, 4, 5)


class RatingQuiz:
    """Shuffled real and generated images rated 1..5 on each item, summarised as a reader study reports it:
    mean +- sd per item and source, and the two-sided Mann-Whitney U test of real against generated (Urata et
    al., Table 2). ``images[i]`` [H, W] is shown i-th; ``truth[i]`` is "real" or "generated"; ``prompts[i]`` the
    prompt the image was generated from (for a real one, written from its scores); ``ratings[i]`` the item scores.
    """

    def __init__(self, real: Any, generated: Any, prompts_real: Any = None, prompts_generated: Any = None,
                 items: tuple[str, ...] = RATING_ITEMS, seed: int = 0) -> None:
        real, generated = [np.asarray(x) for x in real], [np.asarray(x) for x in generated]
        if not real or not generated:
            raise ValueError("a rating study needs at least one real and one generated image")
        prompts_real = list(prompts_real) if prompts_real is not None else [""] * len(real)
        prompts_generated = list(prompts_generated) if prompts_generated is not None else [""] * len(generated)
        order = np.random.default_rng(seed).permutation(len(real) + len(generated))
        pool = ([(x, "real", p) for x, p in zip(real, prompts_real)]
                + [(x, "generated", p) for x, p in zip(generated, prompts_generated)])
        self.images = [pool[i][0] for i in order]
        self.truth = [pool[i][1] for i in order]
        self.prompts = [pool[i][2] for i in order]
        self.items = tuple(items)
        self.ratings: list[dict[str, int] | None] = [None] * len(self.images)

    def __len__(self) -> int:
        return len(self.images)

    def rate(self, index: int, scores: Mapping[str, int]) -> None:
        """Record one image's scores: every item, each an integer 1..5."""
        missing = [i for i in self.items if i not in scores]
        bad = {k: v for k, v in scores.items() if k in self.items and v not in RATING_SCALE}
        if missing or bad:
            raise ValueError(f"rate every item of {self.items} with an integer 1..5; missing {missing}, invalid {bad}")
        self.ratings[int(index)] = {i: int(scores[i]) for i in self.items}

    def rate_all(self, sheet: Any) -> "RatingQuiz":
        """Record a whole rating sheet (one mapping per image, in the shown order)."""
        sheet = list(sheet)
        if len(sheet) != len(self):
            raise ValueError(f"{len(sheet)} rating rows for {len(self)} images")
        for i, scores in enumerate(sheet):
            self.rate(i, scores)
        return self

    def demo_sheet(self, seed: int = 0) -> list[dict[str, int]]:
        """A fixed sheet of seeded scores for batch runs: it shows the table's shape, it is not a reader study."""
        rng = np.random.default_rng(seed)
        return [{i: int(rng.integers(1, 6)) for i in self.items} for _ in self.images]

    def summary(self) -> Any:
        """Rows: the items; columns: "real" and "generated" as "mean +- sd", and the Mann-Whitney p-value."""
        import pandas as pd
        from scipy.stats import mannwhitneyu

        rows = {}
        for item in self.items:
            by = {s: [r[item] for r, t in zip(self.ratings, self.truth) if r is not None and t == s]
                  for s in ("real", "generated")}
            cells = {s: (f"{np.mean(v):.2f} ± {np.std(v, ddof=1) if len(v) > 1 else 0.0:.2f}" if v else "-")
                     for s, v in by.items()}
            p = (float(mannwhitneyu(by["real"], by["generated"], alternative="two-sided").pvalue)
                 if by["real"] and by["generated"] else float("nan"))
            rows[item] = {**cells, "Mann-Whitney p": p}
        return pd.DataFrame.from_dict(rows, orient="index")


def rating_quiz(quiz: RatingQuiz, window: tuple[float, float] | None = (-1000.0, 400.0), size: float = 3.0) -> Any:
    """One image at a time with a 1..5 slider per item and a "next" button; after the last, the summary. Returns
    the widget, or None without ipywidgets (rate with ``quiz.rate``)."""
    try:
        import ipywidgets as w
    except ImportError:
        return None
    state = {"i": 0}
    image, status, out = w.Image(format="png"), w.HTML(), w.Output()
    sliders = {item: w.IntSlider(value=3, min=1, max=5, description=item) for item in quiz.items}
    button = w.Button(description="next")

    def show() -> None:
        i = state["i"]
        if i < len(quiz):
            image.value = _png(quiz.images[i], {}, window, f"image {i + 1} of {len(quiz)}", size)
            status.value = f"prompt: {quiz.prompts[i]}" if quiz.prompts[i] else "rate each item 1..5"
            return
        button.disabled = True
        status.value = "done"
        with out:
            print(quiz.summary())

    def on_click(_: Any) -> None:
        quiz.rate(state["i"], {item: s.value for item, s in sliders.items()})
        state["i"] += 1
        show()

    button.on_click(on_click)
    show()
    return w.VBox([image, status, *sliders.values(), button, out])
