"""The shared base of the five method faces: what chapters 08-11 need from a method.

A face turns (cfg, run dir, conditions, seed) into samples. It never trains or samples by itself: it
calls its method's public API (``ensure_trained`` / ``load`` / ``sample``-like functions), so a method
joins the synthetic datasets, the leaderboard and the downstream chapters through one class in its
``method.py``, listed in :data:`lungsynth.sampling.registry.FACES`.

A sample is ``{"arrays": {...}, "nodules": [rows] (optional), "info": {...}, "attributes": {...} (optional)}``
with the generated image in HU (``ct`` for volume/crop units, ``image`` for slice/ROI units) and any mask
the method changed; masks it did not change come from the condition (:mod:`lungsynth.sampling.writer`).
"""

from __future__ import annotations

import copy
import importlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lungsynth.data.conditions import Condition, real_conditions
from lungsynth.exports import module_present


class MethodFace:
    """A method's face for chapters 08-11. Subclasses set ``name``, ``unit``, ``module`` and implement
    :meth:`run_dir`, :meth:`ensure_trained`, :meth:`load` and :meth:`generate`.

    ``options`` are method-specific sampling settings (sampler, steps, guidance scale, ...), recorded with
    every sample.
    """

    name: str = ""
    unit: str = "volume"
    module: str = ""
    chapter: str = ""
    variant: str | None = None
    description: str = ""
    # the leaderboard's count in `full`: the method's paper's evaluation count where it prints one (each face says);
    # None: one per held-out case (Lung-DDPM evaluates on its held-out set)
    paper_samples: int | None = None
    # the chapter 02 autoencoder the method decodes through, whose reconstructions of real held-out items make the
    # leaderboard's ceiling row (:meth:`autoencoder_kind`); None: the method works in pixel space
    autoencoder: str | None = None

    def __init__(self, variant: str | None = None, **options: Any) -> None:
        self.options = dict(options)
        if variant is not None:
            self.variant = variant

    def with_options(self, **options: Any) -> "MethodFace":
        """A copy of this face with ``options`` added to (or replacing) its own; the registered face is unchanged."""
        face = copy.copy(self)
        face.options = {**self.options, **options}
        return face

    # ------------------------------------------------------------------ the method's module and runs

    def available(self) -> bool:
        """True when the method's module can be imported (it has landed)."""
        return module_present(self.module)

    def api(self) -> Any:
        return importlib.import_module(self.module)

    def autoencoder_kind(self, cfg: Any) -> str | None:
        """The chapter 02 autoencoder kind the method's samples are decoded by under ``cfg`` (None: pixel space,
        or weights from outside the course)."""
        return self.autoencoder

    def run_dir(self, cfg: Any) -> Path:
        """The method's default run directory for ``cfg.profile`` (not created)."""
        raise ValueError(f"{self.name}: no default run directory; pass --checkpoint")

    def is_trained(self, cfg: Any, run_dir: Path | str | None = None) -> bool:
        run = Path(run_dir) if run_dir is not None else self.run_dir(cfg)
        return (run / "final.pt").is_file()

    def ensure_trained(self, cfg: Any) -> Path:
        """Train (or resume) the default run when it has no final checkpoint; returns its run dir."""
        raise ValueError(f"{self.name}: cannot train from chapter 08; train it in its chapter")

    def load(self, cfg: Any, run_dir: Path) -> Any:
        raise ValueError(f"{self.name}: no loader")

    # ------------------------------------------------------------------ conditions and samples

    def spacing_mm(self, cfg: Any) -> float:
        """Voxel spacing of the generated volumes (written into the NIfTI affines)."""
        return float(cfg.data.spacing_3d_mm)

    def conditions(self, cfg: Any, source: str, n: int, seed: int = 0, root: Path | str | None = None
                   ) -> list[Condition]:
        """``heldout``: the real test split's masks; ``sampler``: the method's own condition sampler
        (default: real training masks drawn at random)."""
        return real_conditions(cfg, self.unit, n, source=source, seed=seed, root=root)

    def generate(self, cfg: Any, model: Any, conditions: Sequence[Condition], seed: int) -> list[dict[str, Any]]:
        raise ValueError(f"{self.name}: no generator")

    def quality_gates(self, cfg: Any) -> list[Any]:
        """The chapter's quality gates (:class:`lungsynth.gates.Gate` rows) on its trained run; never trains.
        A face without gates returns none, and the report lists its chapter as having no gates yet."""
        return []

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "unit": self.unit, "module": self.module, "chapter": self.chapter,
                "variant": self.variant, "options": dict(self.options), "available": self.available()}


def stack_arrays(conds: Sequence[Condition], key: str) -> np.ndarray:
    """``conds[i].arrays[key]`` stacked on a new first axis."""
    return np.stack([np.asarray(c.arrays[key]) for c in conds])


def condition_volume_from(lung: np.ndarray, label: np.ndarray, rows: Sequence[dict[str, Any]]) -> np.ndarray:
    """The prepared ``cond`` volume (background 0, lung 0.5, nodule ``texture`` 1..5, all / 5) of a lung mask and
    a label map whose values are the rows' ``label_value``; [D, H, W] float32."""
    cond = np.where(np.asarray(lung) > 0, 0.5, 0.0).astype(np.float32)
    for r in rows:
        cond[label == int(r["label_value"])] = float(r["texture"])
    return cond / 5.0
