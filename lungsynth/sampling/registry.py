"""``METHODS = {name: adapter}``: how chapter 08 drives every method chapter through its public API.

An adapter turns (cfg, run dir, conditions, seed) into samples. It never trains or samples by itself:
it calls the method's ``ensure_trained`` / ``load`` / ``sample``-like functions, so a method joins
the synthetic datasets and the leaderboard by adding one adapter here. Methods whose module is not
importable are skipped (:func:`available_methods`).

A sample is ``{"arrays": {...}, "nodules": [rows] (optional), "info": {...}, "attributes": {...} (optional)}``
with the generated image in HU (``ct`` for volume/crop units, ``image`` for slice/ROI units) and any mask
the method changed; masks it did not change come from the condition (:mod:`lungsynth.sampling.writer`).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lungsynth.sampling.conditions import Condition, real_conditions


class MethodAdapter:
    """Base adapter. Subclasses set ``name``, ``unit``, ``module`` and implement :meth:`load`, :meth:`generate`.

    ``options`` are method-specific sampling settings (sampler, steps, guidance scale, ...), recorded with
    every sample.
    """

    name: str = ""
    unit: str = "volume"
    module: str = ""
    chapter: str = ""
    variant: str | None = None
    description: str = ""

    def __init__(self, **options: Any) -> None:
        self.options = dict(options)

    # ------------------------------------------------------------------ the method's module and runs

    def available(self) -> bool:
        """True when the method's module can be imported (it has landed)."""
        try:
            return importlib.util.find_spec(self.module) is not None
        except ModuleNotFoundError:
            return False

    def api(self) -> Any:
        return importlib.import_module(self.module)

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

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "unit": self.unit, "module": self.module, "chapter": self.chapter,
                "variant": self.variant, "options": dict(self.options), "available": self.available()}


def _stack(conds: Sequence[Condition], key: str) -> np.ndarray:
    return np.stack([np.asarray(c.arrays[key]) for c in conds])


# --------------------------------------------------------------------------- chapter 03: LAND


class LandAdapter(MethodAdapter):
    """LAND (chapter 03): whole volumes from the prepared ``cond`` volume; masks stay the condition's."""

    name, unit, module, chapter = "land", "volume", "lungsynth.methods.land", "03"
    description = "3D latent diffusion with anatomical masks"

    def __init__(self, variant: str = "mask", **options: Any) -> None:
        super().__init__(**options)
        self.variant = variant

    def run_dir(self, cfg: Any) -> Path:
        return self.api().default_run_dir(cfg, self.variant, create=False)

    def ensure_trained(self, cfg: Any) -> Path:
        return self.api().ensure_trained(cfg, self.variant)

    def load(self, cfg: Any, run_dir: Path) -> Any:
        return self.api().load(cfg, self.variant, run_dir, train_if_missing=False)

    def generate(self, cfg, model, conditions, seed):
        land = self.api()
        cond = None if self.variant == "none" else _stack(conditions, "cond")[:, None].astype(np.float32)
        out = land.sample(model, cond, n=len(conditions), sampler=self.options.get("sampler"),
                          steps=self.options.get("steps"), seed=int(seed))
        hu = out["ct_hu"].numpy()
        info = {"sampler": out["sampler"], "steps": out["steps"], "variant": self.variant}
        return [{"arrays": {"ct": hu[i, 0]}, "info": info} for i in range(len(conditions))]


# --------------------------------------------------------------------------- chapter 05: HR-LDM


class HrLdmAdapter(MethodAdapter):
    """HR-LDM (chapter 05): one nodule of a subtype inpainted into a real scan (the condition's CT and lung).

    The written label map holds the scan's real nodules (1..k) and the inpainted one (k+1); its subtype
    is the condition's first nodule's (heldout) or drawn uniformly (sampler).
    """

    name, unit, module, chapter = "hr_ldm", "volume", "lungsynth.methods.hr_ldm", "05"
    description = "histogram-regularised latent inpainting"
    TEXTURE_OF_SUBTYPE = {0: 5, 1: 3, 2: 1}

    def __init__(self, hist_loss: bool = True, **options: Any) -> None:
        super().__init__(**options)
        self.hist_loss = hist_loss
        self.variant = "hist" if hist_loss else "no_hist"
        self._library: Any = None

    def run_dir(self, cfg: Any) -> Path:
        from lungsynth import paths

        return paths.run_dir(cfg.profile, self.api().run_name(self.hist_loss), create=False)

    def ensure_trained(self, cfg: Any) -> Path:
        return self.api().ensure_trained(cfg, self.hist_loss)

    def load(self, cfg: Any, run_dir: Path) -> Any:
        return self.api().load(cfg, run_dir, self.hist_loss)

    def generate(self, cfg, model, conditions, seed):
        hr = self.api()
        if self._library is None:
            self._library = hr.NoduleLibrary.from_prepared(cfg, "train")
        rng = np.random.default_rng(int(seed))
        out = []
        for k, c in enumerate(conditions):
            sub = int(c.nodules[0]["subtype_id"]) if c.nodules and c.source == "heldout" else int(rng.integers(3))
            res = hr.inpaint_volume(model, c.arrays["ct"], c.arrays["lung"], sub, spacing_mm=self.spacing_mm(cfg),
                                    library=self._library, seed=int(seed) + k, steps=self.options.get("steps"))
            label = np.asarray(c.arrays["label"]).astype(np.uint8).copy()
            new = int(label.max()) + 1
            label[(res.nodule_mask > 0) & (label == 0)] = new
            hrmask = np.maximum(np.asarray(c.arrays["hrmask"]), np.moveaxis(res.hrmask, 0, -1))
            tex = self.TEXTURE_OF_SUBTYPE[sub]
            rows = [dict(r) for r in c.nodules] + [{
                "label_value": new, "texture": tex, "subtype": ("solid", "part-solid", "ground-glass")[sub],
                "subtype_id": sub, "diameter_mm": float(res.diameter_mm), "inpainted": True}]
            out.append({"arrays": {"ct": res.ct_hu, "label": label, "hrmask": hrmask,
                                   "cond": _cond_from(c.arrays["lung"], label, rows)},
                        "nodules": rows, "info": {"subtype": sub, "centre": list(map(int, res.centre)),
                                                  "inpainted_label": new}})
        return out


def _cond_from(lung: np.ndarray, label: np.ndarray, rows: Sequence[dict[str, Any]]) -> np.ndarray:
    cond = np.where(np.asarray(lung) > 0, 0.5, 0.0).astype(np.float32)
    for r in rows:
        cond[label == int(r["label_value"])] = float(r["texture"])
    return cond / 5.0


# --------------------------------------------------------------------------- chapter 06: Lung-DDPM


class LungDdpmAdapter(MethodAdapter):
    """Lung-DDPM (chapter 06): whole volumes at ``cfg.data.size_ddpm`` from the condition's lung + nodule
    layout, with anatomically aware sampling against the condition's real CT (paired: masked MSE)."""

    name, unit, module, chapter = "lung_ddpm", "volume", "lungsynth.methods.lung_ddpm", "06"
    description = "pixel-space 3D DDPM with anatomically aware sampling"

    def __init__(self, variant: str = "layout", **options: Any) -> None:
        super().__init__(**options)
        self.variant = variant

    def run_dir(self, cfg: Any) -> Path:
        from lungsynth import paths

        return paths.run_dir(cfg.profile, self.api().RUN_NAMES[self.variant], create=False)

    def ensure_trained(self, cfg: Any) -> Path:
        return self.api().ensure_trained(cfg, self.variant)

    def load(self, cfg: Any, run_dir: Path) -> Any:
        return self.api().load(cfg, self.variant, run_dir, train_if_missing=False)

    def spacing_mm(self, cfg: Any) -> float:
        return float(cfg.data.spacing_3d_mm) * int(cfg.data.size_3d) / int(cfg.data.size_ddpm)

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

    def generate(self, cfg, model, conditions, seed):
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
                            "cond": _cond_from(s["lung"], s["label"], c.nodules)}, "info": info}
                for i, (s, c) in enumerate(zip(small, conditions))]


# --------------------------------------------------------------------------- chapter 04: bbox LDM


class BboxLdmAdapter(MethodAdapter):
    """The 2D box/attribute LDM (chapter 04): nodule centre slices from a square box and five scores.

    ``heldout`` uses the real test slice's box and median scores (its nodule mask is kept for Dice);
    ``sampler`` uses the chapter's anatomical box sampler (box in a real training lung, real attributes).
    """

    name, unit, module, chapter = "bbox_ldm", "slice", "lungsynth.methods.bbox_ldm", "04"
    description = "2D LDM with a nodule box and LIDC attributes"

    def __init__(self, config: int = 3, **options: Any) -> None:
        super().__init__(**options)
        self.config = int(config)
        self.variant = f"config{self.config}"

    def run_dir(self, cfg: Any) -> Path:
        return self.api().default_run_dir(cfg, self.config, create=False)

    def ensure_trained(self, cfg: Any) -> Path:
        return self.api().ensure_trained(cfg, self.config)

    def load(self, cfg: Any, run_dir: Path) -> Any:
        return self.api().load(cfg, self.config, run_dir)

    def conditions(self, cfg, source, n, seed=0, root=None):
        if source == "heldout":
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

    def generate(self, cfg, model, conditions, seed):
        import torch

        api = self.api()
        boxes = api.boxes_from_masks(torch.from_numpy(_stack(conditions, "box")).float()[:, None]).numpy()
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


# --------------------------------------------------------------------------- chapter 07: text-to-image


class Text2ImgAdapter(MethodAdapter):
    """The text-to-image LDM (chapter 07): nodule ROIs from prompts written from the condition's scores."""

    name, unit, module, chapter = "text2img", "roi", "lungsynth.methods.text2img", "07"
    description = "text-to-image LDM of nodule ROIs"

    def run_dir(self, cfg: Any) -> Path:
        from lungsynth import paths

        return paths.run_dir(cfg.profile, "07_text2img", create=False)

    def ensure_trained(self, cfg: Any) -> Path:
        self.api().ensure_trained(cfg)
        return self.run_dir(cfg)

    def load(self, cfg: Any, run_dir: Path) -> Any:
        return self.api().load(cfg, run_dir)

    def generate(self, cfg, model, conditions, seed):
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


# --------------------------------------------------------------------------- the registry

METHODS: dict[str, MethodAdapter] = {}


def register_method(adapter: MethodAdapter, replace: bool = False) -> MethodAdapter:
    """Add an adapter under ``adapter.name`` (a second one under the same name needs ``replace``)."""
    if not adapter.name:
        raise ValueError("an adapter needs a name")
    if adapter.name in METHODS and not replace:
        raise ValueError(f"method {adapter.name!r} is already registered; pass replace=True to swap it")
    METHODS[adapter.name] = adapter
    return adapter


for _adapter in (LandAdapter(), BboxLdmAdapter(), HrLdmAdapter(), LungDdpmAdapter(), Text2ImgAdapter()):
    register_method(_adapter)


def get_method(name: str) -> MethodAdapter:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(METHODS)}")
    adapter = METHODS[name]
    if not adapter.available():
        raise ValueError(f"method {name!r} is registered but its module {adapter.module} is not installed yet")
    return adapter


def available_methods() -> list[str]:
    """Names of registered methods whose module can be imported."""
    return [name for name, a in METHODS.items() if a.available()]


def trained_methods(cfg: Any) -> list[str]:
    """Available methods whose default run has a final checkpoint for ``cfg.profile``."""
    out = []
    for name in available_methods():
        try:
            if METHODS[name].is_trained(cfg):
                out.append(name)
        except (ValueError, ImportError, AttributeError):
            continue
    return out
