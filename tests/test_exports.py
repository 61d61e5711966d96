"""Lazy public names of a package: loaded on first use, private or doubled names refused, and a public
function keeps its name when the room of the same name is imported."""

import importlib
import sys

import pytest

from lungsynth.exports import lazy_exports

INIT = '''
from lungsynth.exports import lazy_exports
__all__, __getattr__, __dir__ = lazy_exports(__name__, {"train": ("train", "STEPS"), "model": ("Net",)})
'''


@pytest.fixture
def toy_package(tmp_path):
    pkg = tmp_path / "toypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(INIT)
    (pkg / "train.py").write_text("STEPS = 3\n\ndef train():\n    return 'trained'\n")
    (pkg / "model.py").write_text("import toypkg.train\n\nclass Net:\n    pass\n")
    sys.path.insert(0, str(tmp_path))  # (monkeypatch.syspath_prepend trips on pylidc's pkg_resources shim)
    importlib.invalidate_caches()
    yield "toypkg"
    sys.path.remove(str(tmp_path))
    for name in [m for m in sys.modules if m == "toypkg" or m.startswith("toypkg.")]:
        del sys.modules[name]


def test_names_load_on_first_use(toy_package):
    pkg = importlib.import_module(toy_package)
    assert "toypkg.train" not in sys.modules and "toypkg.model" not in sys.modules
    assert pkg.__all__ == ["Net", "STEPS", "train"] and dir(pkg) == pkg.__all__
    assert pkg.STEPS == 3 and "toypkg.train" in sys.modules and "toypkg.model" not in sys.modules
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        pkg.missing


def test_a_function_keeps_its_name_over_its_room(toy_package):
    pkg = importlib.import_module(toy_package)
    importlib.import_module("toypkg.model")  # imports the room toypkg.train, which binds it on the package
    assert callable(pkg.train) and pkg.train() == "trained"
    assert importlib.import_module("toypkg.train").STEPS == 3  # the room itself is still reachable


def test_private_and_doubled_names_are_refused():
    with pytest.raises(ValueError, match="private name '_helper'"):
        lazy_exports("nopkg", {"train": ("_helper",)})
    with pytest.raises(ValueError, match="'fit' is listed in both 'train' and 'sample'"):
        lazy_exports("nopkg", {"train": ("fit",), "sample": ("fit",)})
