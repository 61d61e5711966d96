"""LAND (chapter 03) plots room: the chapter's figure of one held-out condition, its real volume and each
variant's sample, with the mean HU inside the nodule of every panel."""

import importlib

import matplotlib
import torch
from land_tiny import phantom_cond, tiny_cfg

matplotlib.use("Agg")
plots = importlib.import_module("lungsynth.methods.land.plots")
train = importlib.import_module("lungsynth.methods.land.train")


class _Held:
    """Two held-out items; the second has the larger nodule, so the figure must show it."""

    def __init__(self):
        self.cond = torch.cat([phantom_cond(16, (6, 6, 6), 2), phantom_cond(16, (4, 4, 4), 6)])
        self.ct = torch.where(self.cond > 0.15, 0.8, 0.1)  # nodule bright, everything else dark (unit range)

    def __len__(self):
        return 2

    def chunk(self, indices, key):
        return getattr(self, key)[list(indices)]


def test_plot_variants_shows_the_largest_nodule_real_and_every_variant(monkeypatch):
    cfg = tiny_cfg(16)
    held = _Held()
    seen = {}

    def fake_sample(model, cond, n, seed=0):
        seen[model] = cond
        hu = torch.full((1, 1, 16, 16, 16), -800.0)
        if model == "mask":  # a variant that follows the mask: its nodule 400 HU bright
            hu[cond > 0.15] = 400.0
        return {"ct_hu": hu}

    monkeypatch.setattr(train, "HeldoutVolumes", lambda cfg: held)
    monkeypatch.setattr(plots, "sample", fake_sample)
    fig, hu = plots.plot_variants(cfg, {"none": "none", "mask": "mask"}, seed=0)
    assert seen["none"] is None and torch.equal(seen["mask"], held.cond[1:2])  # the larger nodule, none unconditioned
    assert list(hu) == ["real", "none", "mask"]
    real_hu = cfg.data.hu_min + 0.8 * (cfg.data.hu_max - cfg.data.hu_min)
    assert abs(hu["real"] - real_hu) < 1e-3 and hu["none"] == -800.0 and hu["mask"] == 400.0
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[0] == "condition" and len(titles) == 4 and titles[-1].startswith("mask: 400 HU")
