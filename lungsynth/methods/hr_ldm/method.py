"""HR-LDM's face for chapters 08-11: a nodule of a subtype inpainted into a real scan."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lungsynth.data.conditions import Condition
from lungsynth.methods.base import MethodFace, condition_volume_from


class HrLdmMethod(MethodFace):
    """HR-LDM (chapter 05): one nodule of a subtype inpainted into a scan (the condition's healthy twin on phantom
    data, else its CT) inside its lung.

    The written label map holds the inpainted nodule, after the scan's real nodules (1..k) when those are in the
    background; its subtype is the condition's first nodule's (heldout, validation), else drawn uniformly (sampler)
    or, with
    the option ``subtype_counts`` = (solid, part-solid, ground-glass), taken from a plan holding each subtype that
    many times in a fixed shuffled order (sample ``index`` reads entry ``index`` mod the plan's length), so that a
    pool can be generated to the size each class's balancing needs (chapter 11).
    """

    name, unit, module, chapter = "hr_ldm", "volume", "lungsynth.methods.hr_ldm", "05"
    autoencoder = "vae3d"
    paper_samples = 500  # HR-LDM, Sec. 4: 500 real and 500 synthetic nodule volumes
    description = "histogram-regularised latent inpainting"
    TEXTURE_OF_SUBTYPE = {0: 5, 1: 3, 2: 1}

    def __init__(self, hist_loss: bool = True, **options: Any) -> None:
        super().__init__(**options)
        self.hist_loss = hist_loss
        self.variant = "hist" if hist_loss else "no_hist"
        self._library: Any = None

    def run_dir(self, cfg: Any) -> Path:
        return self.api().default_run_dir(cfg, self.hist_loss, create=False)

    def ensure_trained(self, cfg: Any) -> Path:
        return self.api().ensure_trained(cfg, self.hist_loss)

    def load(self, cfg: Any, run_dir: Path) -> Any:
        return self.api().load(cfg, run_dir, self.hist_loss)

    def subtype_plan(self) -> np.ndarray | None:
        """The subtypes of the ``subtype_counts`` option, each repeated its count, in a fixed shuffled order (so any
        first part of a pool holds the classes in about the planned shares); None without the option."""
        counts = self.options.get("subtype_counts")
        if counts is None:
            return None
        counts = [int(n) for n in counts]
        if len(counts) != 3 or min(counts) < 0 or sum(counts) == 0:
            raise ValueError(f"subtype_counts must be three counts >= 0 (solid, part-solid, ground-glass) with a "
                             f"positive sum, got {tuple(counts)}")
        return np.random.default_rng(0).permutation(np.repeat(np.arange(3), counts))

    def quality_gates(self, cfg: Any) -> list[Any]:
        from lungsynth.methods.hr_ldm.evaluate import quality_gates

        return quality_gates(cfg)

    def generate(self, cfg: Any, model: Any, conditions: Sequence[Condition], seed: int) -> list[dict[str, Any]]:
        """One nodule per condition, inpainted into the scan's healthy twin when it has one (the paper inpaints
        into healthy lungs; the label map then holds only the new nodule), else into the scan itself, away from
        its nodules (which keep their labels). ``hr_ldm.subpleural_share`` of the nodules go to the rim."""
        hr = self.api()
        if self._library is None:
            self._library = hr.NoduleLibrary.from_prepared(cfg, "train")
        rng = np.random.default_rng(int(seed))
        n_rim = int(round(float(cfg.hr_ldm.subpleural_share) * len(conditions)))
        rim = set(rng.permutation(len(conditions))[:n_rim].tolist())
        out = []
        plan = self.subtype_plan()
        for k, c in enumerate(conditions):
            if c.nodules and c.source in ("heldout", "validation"):  # real conditions carry their nodule's subtype
                sub = int(c.nodules[0]["subtype_id"])
            else:
                sub = int(plan[c.index % len(plan)]) if plan is not None else int(rng.integers(3))
            healthy = "healthy" in c.arrays
            ct = c.arrays["healthy"] if healthy else c.arrays["ct"]
            label = np.zeros_like(np.asarray(c.arrays["label"]), dtype=np.uint8) if healthy else \
                np.asarray(c.arrays["label"]).astype(np.uint8).copy()
            old_rows = [] if healthy else [dict(r) for r in c.nodules]
            res = hr.inpaint_volume(model, ct, c.arrays["lung"], sub, spacing_mm=self.spacing_mm(cfg),
                                    library=self._library, seed=int(seed) + k, steps=self.options.get("steps"),
                                    subpleural=k in rim, exclude=label > 0)
            new = int(label.max()) + 1
            label[res.nodule_mask > 0] = new  # never on an old nodule: inpaint_volume keeps away from `exclude`
            old_hr = np.zeros_like(np.asarray(c.arrays["hrmask"])) if healthy else np.asarray(c.arrays["hrmask"])
            hrmask = np.maximum(old_hr, np.moveaxis(res.hrmask, 0, -1))
            rows = old_rows + [{
                "label_value": new, "texture": self.TEXTURE_OF_SUBTYPE[sub],
                "subtype": ("solid", "part-solid", "ground-glass")[sub], "subtype_id": sub,
                "diameter_mm": float(res.diameter_mm), "inpainted": True, "subpleural": bool(res.subpleural)}]
            out.append({"arrays": {"ct": res.ct_hu, "label": label, "hrmask": hrmask,
                                   "cond": condition_volume_from(c.arrays["lung"], label, rows)},
                        "nodules": rows, "info": {"subtype": sub, "centre": list(map(int, res.centre)),
                                                  "inpainted_label": new, "background": "healthy twin" if healthy
                                                  else "scan with its nodules", "subpleural": bool(res.subpleural)}})
        return out
