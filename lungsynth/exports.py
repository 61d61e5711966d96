"""Public names of a package, loaded from its rooms on first use (PEP 562).

A package's ``__init__`` lists which room defines each public name; importing the package stays
cheap (no torch), so ``lungsynth --help`` and a method's ``cli.register`` never pay for the model::

    __all__, __getattr__, __dir__ = lazy_exports(__name__, {"model": ("Net", "loss"), "train": ("train",)})

A method's ``train``, ``sample`` and ``evaluate`` name both a room and the function it defines. Importing
a room makes the import system bind the submodule on the package under its name, over the function;
:class:`PublicPackage` keeps the public function there. So ``land.train(...)`` is always the function;
reach a room with ``from lungsynth.methods.land.train import name`` or ``importlib.import_module``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Any, Callable, Mapping, Sequence


class PublicPackage(ModuleType):
    """A package module whose public names win over same-named submodules bound by the import system."""

    def __setattr__(self, name: str, value: Any) -> None:
        if (isinstance(value, ModuleType) and value.__name__ == f"{self.__name__}.{name}"
                and name in self.__dict__.get("__all__", ()) and hasattr(value, name)):
            value = getattr(value, name)
        super().__setattr__(name, value)


def lazy_exports(package: str, rooms: Mapping[str, Sequence[str]]
                 ) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """``(__all__, __getattr__, __dir__)`` for ``package`` whose public names live in ``rooms``.

    ``rooms`` maps a submodule name (relative to ``package``) to the names it defines. A name listed
    twice is a mistake and raises ValueError, as does a private (``_``-prefixed) name. The package's
    module becomes a :class:`PublicPackage`.
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
    module = sys.modules.get(package)
    if module is not None and type(module) is ModuleType:
        module.__class__ = PublicPackage

    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(importlib.import_module(f"{package}.{where[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return list(public)

    return public, __getattr__, __dir__


def module_present(name: str) -> bool:
    """True when module ``name`` can be imported (False when it, or a package above it, is missing)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False
