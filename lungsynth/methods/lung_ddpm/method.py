"""Lung-DDPM's face for chapters 08-11: whole volumes at ``size_ddpm`` from a lung + nodule layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lungsynth.data.conditions import Condition
from lungsynth.methods.base import MethodFace, condition_volume_from


class LungDdpmMethod(MethodFace):
    """Lung-DDPM (chapter 06): whole volumes at ``cfg.data.size_ddpm`` from the condition's lung + nodule
    layout, with anatomically aware sampling against the condition's real CT (paired: masked MSE)."""

    name, unit, module, chapter = "lung_ddpm", "volume", "lungsynth.methods.lung_ddpm", "06"
    paper_samples = None  # Lung-DDPM evaluates on its held-out set: one sample per held-out case
    variant = "layout"  # the default; "no_lung_layout" is the ablation
    description = "pixel-space 3D DDPM with anatomically aware sampling"

    def run_dir(self, cfg: Any) -> Path:
        return self.api().default_run_dir(cfg, self.variant, create=False)

    def quality_gates(self, cfg: Any) -> list[Any]:
        from lungsynth.methods.lung_ddpm.evaluate import quality_gates

        return quality_gates(cfg)

    def ensure_trained(self, cfg: Any) -> Path:
        return self.api().ensure_trained(cfg, self.variant)

    def load(self, cfg: Any, run_dir: Path) -> Any:
        return self.api().load(cfg, self.variant, run_dir, train_if_missing=False)

    def spacing_mm(self, cfg: Any) -> float:
        return self.api().voxel_mm(cfg)

    def resized(self, cfg: Any, c: Condition) -> dict[str, np.ndarray]:
        """The condition's volumes at ``size_ddpm`` (masks max-pooled, CT trilinear)."""
        import torch

        from lungsynth.data.datasets import resize_volume

        S = int(cfg.data.size_ddpm)
        out = {}
        for key in ("ct", "lung", "label"):
            t = torch.from_numpy(np.asarray(c.arrays[key], dtype=np.float32))[None]
            out[key] = resize_volume(t, S, "image" if key == "ct" else "mask")[0].numpy()
        hr = torch.from_numpy(np.moveaxis(np.asarray(c.arrays["hrmask"], dtype=np.float32), -1, 0))
        out["hrmask"] = np.moveaxis(resize_volume(hr, S, "mask").numpy(), 0, -1)
        return out

    def generate(self, cfg: Any, model: Any, conditions: Sequence[Condition], seed: int) -> list[dict[str, Any]]:
        import torch

        from lungsynth.data.preprocess import hu_to_unit, unit_to_hu

        ddpm = self.api()
        small = [self.resized(cfg, c) for c in conditions]
        lung = torch.from_numpy(np.stack([s["lung"] for s in small]))[:, None]
        label = torch.from_numpy(np.stack([s["label"] for s in small]))[:, None]
        ref = hu_to_unit(torch.from_numpy(np.stack([s["ct"] for s in small]))[:, None], cfg.data.hu_min,
                         cfg.data.hu_max)
        aas = bool(self.options.get("aas", True))
        x = model.sample(ddpm.make_layout(lung, label), ref, aas=aas, generator=torch.Generator().manual_seed(int(seed)),
                         num_inference_steps=self.options.get("steps"))
        hu = unit_to_hu(x, cfg.data.hu_min, cfg.data.hu_max).numpy()
        info = {"aas": aas, "steps": int(self.options.get("steps") or cfg.lung_ddpm.sample_steps),
                "variant": self.variant, "size": int(cfg.data.size_ddpm)}
        return [{"arrays": {"ct": hu[i, 0], "lung": s["lung"], "label": s["label"], "hrmask": s["hrmask"],
                            "cond": condition_volume_from(s["lung"], s["label"], c.nodules)}, "info": info}
                for i, (s, c) in enumerate(zip(small, conditions))]
