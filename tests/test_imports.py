"""The import graph: no cycles, and the layering of docs/ARCHITECTURE.md.

The static checks read every module with ``ast`` (no framework needed) and follow all its imports of our
modules, function-local ones included (a local import that only dodges a cycle still is one), except those
under ``if TYPE_CHECKING:``, which never run. The graph must be acyclic. The runtime check imports every
module in random orders, each in a fresh interpreter: a load-time cycle fails in some order.
"""
from __future__ import annotations

import ast
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

import pytest

from conftest import IN_CI

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("karat", "detectron2_plugin", "mmseg_configs", "classification")
HOSTS = ("detectron2_plugin", "mmseg_configs", "classification")
# What a package's modules may not import, at any depth, anywhere in the file (docs/ARCHITECTURE.md, "Layers").
HOST_FRAMEWORKS = ("detectron2", "mmseg", "mmdet", "mmcv", "mmengine")
FORBIDDEN: Dict[str, Tuple[str, ...]] = {
    "karat": HOSTS + HOST_FRAMEWORKS + ("tools",),
    "detectron2_plugin": ("mmseg_configs", "classification", "tools", "mmseg", "mmdet", "mmcv", "mmengine"),
    "mmseg_configs": ("detectron2_plugin", "classification", "tools", "detectron2"),
    "classification": ("detectron2_plugin", "mmseg_configs", "tools", *HOST_FRAMEWORKS),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> Dict[str, Path]:
    """Every module of the packages (config files under ``_base_``, ``upernet``... are data, not modules)."""
    found: Dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if all((d / "__init__.py").exists() for d in path.parents if d != ROOT and ROOT in d.parents):
                found[_module_name(path)] = path
    return found


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(body: List[ast.stmt]) -> Iterator[ast.stmt]:
    """Every import statement of ``body``, nested ones included, except under ``if TYPE_CHECKING:``."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _imports(node.orelse)
            continue
        for block in ("body", "orelse", "finalbody", "handlers"):
            yield from _imports(getattr(node, block, None) or [])


def _targets(node: ast.stmt, module: str, is_package: bool) -> Iterator[str]:
    """Absolute names an import statement brings in: ``from a import b`` is ``a.b`` where that is a module."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    for alias in node.names:
        yield f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _own(name: str) -> Optional[str]:
    """The deepest module of ours that ``name`` names (``karat.config.KArAtConfig`` -> ``karat.config``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = {}
    for name, path in MODULES.items():
        is_package = path.name == "__init__.py"
        edges = {_own(t) for node in _imports(_parse(path).body) for t in _targets(node, name, is_package)}
        graph[name] = {e for e in edges if e and e != name}
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None."""
    state: Dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


# ------------------------------------------------------------------------------------------------------
def test_modules_found() -> None:
    for expected in ("karat.config", "karat.bases", "mmseg_configs", "mmseg_configs.backbones",
                     "detectron2_plugin.backbone", "classification.main"):
        assert expected in MODULES
    assert not any(".upernet." in m or "._base_." in m for m in MODULES), "config files are not modules"


def test_find_cycle_detects_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_targets_resolve_relative_and_from_imports() -> None:
    node = ast.parse("from . import convert").body[0]
    assert list(_targets(node, "mmseg_configs.backbones", False)) == ["mmseg_configs.convert"]
    node = ast.parse("from ..config import KArAtConfig").body[0]
    assert {_own(t) for t in _targets(node, "karat.models.convit", False)} == {"karat.config"}
    tree = ast.parse("if TYPE_CHECKING:\n    import a\nelse:\n    import b\ndef f():\n    import c\n"
                     "try:\n    import d\nexcept ImportError:\n    import e\n")
    assert [n.names[0].name for n in _imports(tree.body)] == ["b", "c", "d", "e"]


def test_no_import_cycle() -> None:
    """Imports between our modules form a DAG (a function-local import is no excuse for a cycle)."""
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def _all_imports(path: Path) -> Iterator[Tuple[int, str]]:
    """Every import of a file, function-local ones included, as (line, absolute module name)."""
    name = _module_name(path) if path.is_relative_to(ROOT) else path.stem
    for node in ast.walk(_parse(path)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target in _targets(node, name, path.name == "__init__.py"):
                yield node.lineno, target


@pytest.mark.parametrize("package", PACKAGES)
def test_layering(package: str) -> None:
    """karat/ imports no host; the host plugins never import each other; nothing imports tools/."""
    bad = [f"{path.relative_to(ROOT)}:{line} imports {target}"
           for mod, path in MODULES.items() if mod.split(".")[0] == package
           for line, target in _all_imports(path)
           if target.split(".")[0] in FORBIDDEN[package]]
    assert not bad, "layering broken (docs/ARCHITECTURE.md):\n" + "\n".join(bad)


def test_layering_check_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from mmseg_configs.backbones import KArAtVisionTransformer\n")
    assert [t for _, t in _all_imports(bad) if t.split(".")[0] in FORBIDDEN["karat"]] == ["mmseg_configs.backbones"]


# ------------------------------------------------------------------------------------------------------
def _importable() -> List[str]:
    """Our modules whose frameworks are installed (all of them under CI); ``__main__`` modules run, not import."""
    needs = {"detectron2_plugin": "detectron2", "mmseg_configs": "mmseg", "mmseg_configs.necks": "mmdet"}
    missing = set()
    for prefix, framework in needs.items():
        try:
            __import__(framework)
        except ImportError:
            if IN_CI:
                raise
            missing.add(prefix)
    return [m for m in MODULES if not m.endswith("__main__")
            and not any(m == p or m.startswith(p + ".") for p in missing)]


_IMPORT_ALL = """
import importlib, random, sys
names = sys.argv[2:]
random.Random(int(sys.argv[1])).shuffle(names)
for name in names:
    try:
        importlib.import_module(name)
    except Exception as e:
        sys.exit(f"order {names}: importing {name} failed: {type(e).__name__}: {e}")
print(len(names))
"""


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_module_imports_in_random_order(seed: int) -> None:
    """A fresh interpreter imports every module in a shuffled order; a hidden cycle fails some order."""
    names = _importable()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _IMPORT_ALL, str(seed), *names], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == str(len(names))
