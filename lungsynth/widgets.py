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


def slice_browser(volume: Any, masks: Mapping[str, Any] | None = None, axis: int = 0,
                  window: tuple[float, float] | None = None, size: float = 4.0, index: int | None = None) -> Any:
    """A slider over the slices of ``volume`` [D, H, W] along ``axis`` with mask contours.

    A second slider moves through the axes (0 axial, 1 coronal, 2 sagittal). Returns the widget
    (display it as a cell's last expression), or a static figure without ipywidgets.
    """
    from lungsynth.viz import show_slices, to_numpy

    vol = to_numpy(volume)
    ms = {k: to_numpy(v) for k, v in (masks or {}).items()}
    try:
        import ipywidgets as w
    except ImportError:
        return show_slices(vol, ms, axis=axis, window=window)
    start = vol.shape[axis] // 2 if index is None else int(index)
    if index is None and ms:
        ref = next(iter(ms.values()))
        if ref.any():
            start = int(np.argwhere(ref > 0.5)[:, axis].mean().round())
    view = w.Image(format="png")
    pos = w.IntSlider(value=start, min=0, max=vol.shape[axis] - 1, description="slice",
                      continuous_update=False)
    ax_pick = w.ToggleButtons(options=[("axial", 0), ("coronal", 1), ("sagittal", 2)], value=axis)

    def draw(*_: Any) -> None:
        a, i = ax_pick.value, min(pos.value, vol.shape[ax_pick.value] - 1)
        view.value = _png(np.take(vol, i, axis=a), {k: np.take(m, i, axis=a) for k, m in ms.items()},
                          window, f"{['axial', 'coronal', 'sagittal'][a]} {i}/{vol.shape[a] - 1}", size)

    def on_axis(change: Any) -> None:
        pos.max = vol.shape[change["new"]] - 1
        pos.value = vol.shape[change["new"]] // 2
        draw()

    pos.observe(draw, names="value")
    ax_pick.observe(on_axis, names="value")
    draw()
    return w.VBox([ax_pick, pos, view])


def niivue_view(ct_path: Any, mask_paths: Mapping[str, Any] | None = None, window: tuple[float, float] = (-1000, 400),
                height: int = 400) -> Any:
    """An ipyniivue 3D/multiplanar view of a NIfTI CT with optional mask overlays (offline)."""
    import ipyniivue

    nv = ipyniivue.NiiVue(height=height) if "height" in ipyniivue.NiiVue.class_trait_names() else ipyniivue.NiiVue()
    vols = [{"path": str(ct_path), "colormap": "gray", "cal_min": window[0], "cal_max": window[1]}]
    cmaps = ["green", "red", "blue", "warm"]
    for n, (name, p) in enumerate((mask_paths or {}).items()):
        vols.append({"path": str(p), "colormap": cmaps[n % len(cmaps)], "opacity": 0.5, "cal_min": 0.5,
                     "cal_max": 1.5})
    nv.load_volumes(vols)
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
