"""The package's floors (notes/ARCHITECTURE.md): no import circle, no import from a lower floor to a
higher one, methods never import each other, and removing one method leaves the rest importable.

Imports are read from the source (every ``import`` / ``from ... import`` of a lungsynth module,
including those inside functions), so a lazy import that runs back up is caught too.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lungsynth.paths import PACKAGE_DIR

# Module prefix -> floor. The longest matching prefix wins; a module may import only from its own
# floor's room or from lower floors. Keep in step with notes/ARCHITECTURE.md.
FLOORS: dict[str, int] = {
    "lungsynth": 0, "lungsynth.config": 0, "lungsynth.paths": 0, "lungsynth.runtime": 0,
    "lungsynth.exports": 0, "lungsynth.viz": 0, "lungsynth.gates": 0,
    "lungsynth.engine": 1, "lungsynth.diffusion": 1, "lungsynth.data": 1, "lungsynth.widgets": 1,
    "lungsynth.run_settings": 1,
    "lungsynth.eval": 2,
    "lungsynth.nn": 3,
    "lungsynth.autoencoders": 4,
    "lungsynth.methods.base": 5,
    "lungsynth.methods": 6,
    "lungsynth.sampling": 7,
    "lungsynth.leaderboard": 8, "lungsynth.downstream": 8,
    "lungsynth.course": 9, "lungsynth.bench": 9, "lungsynth.quality": 9,
    "lungsynth.cli": 10, "lungsynth.__main__": 11,
}
METHODS = ("land", "bbox_ldm", "hr_ldm", "lung_ddpm", "text2img")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The lungsynth modules ``path`` imports (``from pkg import mod`` resolves to ``pkg.mod`` when it exists)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "lungsynth")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "lungsynth":
                continue
            subs = {f"{target}.{a.name}" for a in node.names} & known
            found.update(subs or {target})
    found.discard(name)
    return found


def floor_of(module: str) -> tuple[int, str]:
    """(floor, room): the room is the longest FLOORS prefix, or the method package for methods."""
    prefix = max((p for p in FLOORS if module == p or module.startswith(p + ".")), key=len)
    room = prefix
    if prefix == "lungsynth.methods" and module.count(".") >= 2:
        room = ".".join(module.split(".")[:3])
    return FLOORS[prefix], room


def import_graph() -> dict[str, set[str]]:
    mods = all_modules()
    return {name: imports_of(path, name, set(mods)) for name, path in mods.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in graph.items():
        f_src, r_src = floor_of(src)
        for dst in sorted(targets):
            f_dst, r_dst = floor_of(dst)
            if f_dst > f_src or (f_dst == f_src and r_dst != r_src):
                bad.append(f"{src} (floor {f_src}) imports {dst} (floor {f_dst}, room {r_dst})")
    return bad


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_floor():
    for name in all_modules():
        floor_of(name)  # max() of an empty sequence raises for a module outside every floor


def test_no_import_runs_back_up_or_across_peers():
    assert upward_imports(import_graph()) == []


def test_no_import_circle():
    assert circles(import_graph()) == []


def test_the_checks_catch_what_they_guard():
    """The walker sees lazy imports, upward imports, peer imports and circles (a check that cannot fail guards nothing)."""
    graph = import_graph()
    graph["lungsynth.data.datasets"] = graph["lungsynth.data.datasets"] | {"lungsynth.sampling.writer"}
    graph["lungsynth.methods.land.model"] = graph["lungsynth.methods.land.model"] | {"lungsynth.methods.hr_ldm"}
    bad = upward_imports(graph)
    assert any("lungsynth.data.datasets" in b and "sampling.writer" in b for b in bad)
    assert any("lungsynth.methods.land.model" in b and "methods.hr_ldm" in b for b in bad)
    graph["lungsynth.paths"] = {"lungsynth.config"}
    graph["lungsynth.config"] = {"lungsynth.paths"}
    assert ["lungsynth.config", "lungsynth.paths"] in circles(graph)
    # A function-level import is seen: the leaderboard imports the registry inside a function.
    assert "lungsynth.sampling.registry" in import_graph()["lungsynth.leaderboard"]


def test_every_method_has_the_same_rooms():
    rooms = {m: sorted(p.name for p in (PACKAGE_DIR / "methods" / m).glob("*.py")) for m in METHODS}
    expected = ["__init__.py", "bench.py", "cli.py", "evaluate.py", "method.py", "model.py", "plots.py", "sample.py",
                "train.py"]
    assert rooms == {m: expected for m in METHODS}


@pytest.mark.parametrize("name", ["lungsynth.autoencoders", *(f"lungsynth.methods.{m}" for m in METHODS)])
def test_packages_export_only_public_names_and_import_without_torch(name):
    code = (f"import sys, importlib; m = importlib.import_module({name!r}); "
            "import json; print(json.dumps({'all': list(m.__all__), 'torch': 'torch' in sys.modules}))")
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                    check=True).stdout)
    assert out["all"] and not [n for n in out["all"] if n.startswith("_")]
    assert not out["torch"], f"importing {name} imports torch (lungsynth --help would pay for it)"


HIDE = """
import importlib, importlib.abc, json, sys
hidden = sys.argv[1]
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == hidden or name.startswith(hidden + "."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Hide())
for name in json.loads(sys.argv[2]):
    importlib.import_module(name)
from lungsynth.sampling.registry import METHODS
from lungsynth.cli import build_parser
commands = sorted(build_parser()._subparsers._group_actions[0].choices)
print(json.dumps({"methods": sorted(METHODS), "commands": commands}))
"""


@pytest.mark.parametrize("method", METHODS)
def test_the_course_imports_with_one_method_removed(method):
    hidden = f"lungsynth.methods.{method}"
    rooms = [m for m in all_modules() if not (m == hidden or m.startswith(hidden + ".")) and m != "lungsynth.__main__"]
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-c", HIDE, hidden, json.dumps(rooms)], capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["methods"] == sorted(set(METHODS) - {method})
    assert method.replace("_", "-") not in out["commands"] and "synth" in out["commands"]
