"""The bbox/attribute LDM's face for chapters 08-11: nodule centre slices from a box and five scores."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lungsynth.data.conditions import Condition, real_conditions
from lungsynth.methods.base import MethodFace, stack_arrays


class BboxLdmMethod(MethodFace):
    """The 2D box/attribute LDM (chapter 04): nodule centre slices from a square box and five scores.

    ``heldout`` uses the real test slice's box and median scores (its nodule mask is kept for Dice);
    ``sampler`` uses the chapter's anatomical box sampler (box in a real training lung, real attributes).
    """

    name, unit, module, chapter = "bbox_ldm", "slice", "lungsynth.methods.bbox_ldm", "04"
    paper_samples = 2048  # Mari et al., Table 2: 2048 synthetic slices
    description = "2D LDM with a nodule box and LIDC attributes"

    def __init__(self, config: int = 3, **options: Any) -> None:
        super().__init__(**options)
        self.config = int(config)
        self.variant = f"config{self.config}"

    def run_dir(self, cfg: Any) -> Path:
        return self.api().default_run_dir(cfg, self.config, create=False)

    def autoencoder_kind(self, cfg: Any) -> str | None:
        """Chapter 02's VQ-VAE, unless a local diffusers VQModel replaces it (``bbox_ldm.pretrained_vq``)."""
        return None if cfg.bbox_ldm.pretrained_vq else "vqvae2d"

    def ensure_trained(self, cfg: Any) -> Path:
        return self.api().ensure_trained(cfg, self.config)

    def load(self, cfg: Any, run_dir: Path) -> Any:
        return self.api().load(cfg, self.config, run_dir)

    def quality_gates(self, cfg: Any) -> list[Any]:
        from lungsynth.methods.bbox_ldm.evaluate import quality_gates

        return quality_gates(cfg)

    def conditions(self, cfg: Any, source: str, n: int, seed: int = 0, root: Path | str | None = None
                   ) -> list[Condition]:
        if source != "sampler":  # the anatomical sampler draws training slices; other sources are real splits
            return real_conditions(cfg, "slice", n, source=source, seed=seed, root=root)
        api = self.api()
        draw = api.draw_conditions(cfg, "anatomical", int(n), seed)
        train = api.load_split(cfg, "train")
        masks = api.box_masks(draw.boxes, int(cfg.data.size_2d)).numpy()[:, 0]
        out = []
        for i in range(len(draw)):
            j = int(draw.slice_index[i])
            arrays = {"box": masks[i].astype(np.uint8)}
            if j >= 0:
                arrays["lung"] = train["lungs"][j].astype(np.uint8)
            attrs = {a: int(v) for a, v in zip(api.ATTRIBUTES, draw.attributes[i])}
            out.append(Condition(i, "sampler", "slice", scan_id=None, nodule_id=train["nodule_ids"][j] if j >= 0
                                 else None, split="train", arrays=arrays, extra={"sampler": "anatomical", **attrs}))
        return out

    def generate(self, cfg: Any, model: Any, conditions: Sequence[Condition], seed: int) -> list[dict[str, Any]]:
        import torch

        api = self.api()
        boxes = api.boxes_from_masks(torch.from_numpy(stack_arrays(conditions, "box")).float()[:, None]).numpy()
        attrs = []
        for c in conditions:
            row = c.nodules[0] if c.nodules else {a: c.extra[a] for a in api.ATTRIBUTES}
            attrs.append([int(row[a]) for a in api.ATTRIBUTES])
        x = model.sample(boxes, np.array(attrs), seed=int(seed), steps=self.options.get("steps"))
        hu = api.to_hu(x, cfg.bbox_ldm.hu_clip)
        out = []
        for i, c in enumerate(conditions):
            s = {"arrays": {"image": hu[i, 0]}, "info": {"config": self.config}}
            if not c.nodules:
                s["attributes"] = dict(zip(api.ATTRIBUTES, attrs[i]))
            out.append(s)
        return out
