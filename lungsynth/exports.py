"""Public names of a package, loaded from its rooms on first use (PEP 562).

A package's ``__init__`` lists which room defines each public name; importing the package stays
cheap (no torch), so ``lungsynth --help`` and a method's ``cli.register`` never pay for the model::

    __all__, __getattr__, __dir__ = lazy_exports(__name__, {"model": ("Net", "loss"), "train": ("train",)})
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping, Sequence


def lazy_exports(package: str, rooms: Mapping[str, Sequence[str]]
                 ) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """``(__all__, __getattr__, __dir__)`` for ``package`` whose public names live in ``rooms``.

    ``rooms`` maps a submodule name (relative to ``package``) to the names it defines. A name listed
    twice is a mistake and raises ValueError, as does a private (``_``-prefixed) name.
    """
    where: dict[str, str] = {}
    for room, names in rooms.items():
        for name in names:
            if name.startswith("_"):
                raise ValueError(f"{package}: private name {name!r} cannot be public")
            if name in where:
                raise ValueError(f"{package}: {name!r} is listed in both {where[name]!r} and {room!r}")
            where[name] = room
    public = sorted(where)

    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(importlib.import_module(f"{package}.{where[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return list(public)

    return public, __getattr__, __dir__
