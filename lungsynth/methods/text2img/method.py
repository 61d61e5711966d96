"""The text-to-image LDM's face for chapters 08-11: nodule ROIs from prompts written from LIDC scores."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from lungsynth.data.conditions import Condition
from lungsynth.methods.base import MethodFace


class Text2ImgMethod(MethodFace):
    """The text-to-image LDM (chapter 07): nodule ROIs from prompts written from the condition's scores."""

    name, unit, module, chapter = "text2img", "roi", "lungsynth.methods.text2img", "07"
    paper_samples = 500  # Urata et al. print no count (their test split is 208 ROIs): 500 per guidance scale in full
    description = "text-to-image LDM of nodule ROIs"

    def run_dir(self, cfg: Any) -> Path:
        return self.api().default_run_dir(cfg, create=False)

    def autoencoder_kind(self, cfg: Any) -> str | None:
        """Chapter 02's 2D VAE for a run trained in the course; None for a fine-tuned local Stable Diffusion (its own
        VAE, read from the run's ``engine.json``)."""
        import json

        record = self.run_dir(cfg) / "engine.json"
        if record.is_file() and json.loads(record.read_text()).get("config", {}).get("source") != "course":
            return None
        return "vae2d"

    def quality_gates(self, cfg: Any) -> list[Any]:
        from lungsynth.methods.text2img.evaluate import quality_gates

        return quality_gates(cfg)

    def ensure_trained(self, cfg: Any) -> Path:
        self.api().ensure_trained(cfg)
        return self.run_dir(cfg)

    def load(self, cfg: Any, run_dir: Path) -> Any:
        return self.api().load(cfg, run_dir)

    def generate(self, cfg: Any, model: Any, conditions: Sequence[Condition], seed: int) -> list[dict[str, Any]]:
        from lungsynth.data.preprocess import unit_to_hu
        from lungsynth.data.prompts import PROMPT_ATTRIBUTES, write_prompt

        prompts = [write_prompt({k: float(c.nodules[0][k]) for k in PROMPT_ATTRIBUTES}) for c in conditions]
        scale = float(self.options.get("guidance_scale", 5.0))
        steps = int(self.options.get("steps") or cfg.text2img.sample_steps)
        x = self.api().generate(model, prompts, guidance_scale=scale, steps=steps, sampler=cfg.text2img.sampler,
                                seed=int(seed))
        hu = unit_to_hu(x, cfg.data.hu_min, cfg.data.hu_max).numpy()
        return [{"arrays": {"image": hu[i, 0]}, "info": {"prompt": p, "guidance_scale": scale, "steps": steps}}
                for i, p in enumerate(prompts)]
