"""LAND's face for chapters 08-11: whole volumes from the prepared condition volume."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lungsynth.data.conditions import Condition
from lungsynth.methods.base import MethodFace, stack_arrays


class LandMethod(MethodFace):
    """LAND (chapter 03): whole volumes from the prepared ``cond`` volume; masks stay the condition's."""

    name, unit, module, chapter = "land", "volume", "lungsynth.methods.land", "03"
    paper_samples = 100  # the poster prints no count for Table 1: 100 volumes is the course's full evaluation
    variant = "mask"  # the default; LandMethod("none") etc. pick another
    autoencoder = "vae3d"
    description = "3D latent diffusion with anatomical masks"

    def run_dir(self, cfg: Any) -> Path:
        return self.api().default_run_dir(cfg, self.variant, create=False)

    def ensure_trained(self, cfg: Any) -> Path:
        return self.api().ensure_trained(cfg, self.variant)

    def load(self, cfg: Any, run_dir: Path) -> Any:
        return self.api().load(cfg, self.variant, run_dir, train_if_missing=False)

    def quality_gates(self, cfg: Any) -> list[Any]:
        from lungsynth.methods.land.evaluate import quality_gates

        return quality_gates(cfg)

    def generate(self, cfg: Any, model: Any, conditions: Sequence[Condition], seed: int) -> list[dict[str, Any]]:
        land = self.api()
        cond = None if self.variant == "none" else stack_arrays(conditions, "cond")[:, None].astype(np.float32)
        out = land.sample(model, cond, n=len(conditions), sampler=self.options.get("sampler"),
                          steps=self.options.get("steps"), seed=int(seed))
        hu = out["ct_hu"].numpy()
        info = {"sampler": out["sampler"], "steps": out["steps"], "variant": self.variant}
        return [{"arrays": {"ct": hu[i, 0]}, "info": info} for i in range(len(conditions))]
