"""The list of method faces (chapter 08): ``METHODS = {name: face}``.

Every method package has a ``method.py`` holding its face, a :class:`lungsynth.methods.base.MethodFace`
subclass; :data:`FACES` lists them, in chapter order. A face whose package is not importable (a
method removed from a checkout) is skipped, so the rest of the course keeps working. A user's own
method joins the synthetic datasets and the leaderboard with :func:`register_method`.
"""

from __future__ import annotations

import importlib
from typing import Any

from lungsynth.exports import module_present
from lungsynth.methods.base import MethodFace

# (module, class) of each face, in chapter order.
FACES: tuple[tuple[str, str], ...] = (
    ("lungsynth.methods.land.method", "LandMethod"),
    ("lungsynth.methods.bbox_ldm.method", "BboxLdmMethod"),
    ("lungsynth.methods.hr_ldm.method", "HrLdmMethod"),
    ("lungsynth.methods.lung_ddpm.method", "LungDdpmMethod"),
    ("lungsynth.methods.text2img.method", "Text2ImgMethod"),
)

METHODS: dict[str, MethodFace] = {}


def register_method(face: MethodFace, replace: bool = False) -> MethodFace:
    """Add a face under ``face.name`` (a second one under the same name needs ``replace``)."""
    if not face.name:
        raise ValueError("a method face needs a name")
    if face.name in METHODS and not replace:
        raise ValueError(f"method {face.name!r} is already registered; pass replace=True to swap it")
    METHODS[face.name] = face
    return face


for _module, _cls in FACES:
    if module_present(_module):  # a method removed from this checkout is skipped
        register_method(getattr(importlib.import_module(_module), _cls)())


def get_method(name: str) -> MethodFace:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(METHODS)}")
    face = METHODS[name]
    if not face.available():
        raise ValueError(f"method {name!r} is registered but its module {face.module} is not installed")
    return face


def available_methods() -> list[str]:
    """Names of registered methods whose module can be imported."""
    return [name for name, face in METHODS.items() if face.available()]


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
