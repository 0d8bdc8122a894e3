"""ruff, configured in pyproject.toml (pycodestyle + pyflakes, lines of at most 120 characters), is clean."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean() -> None:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is missing: it is in the dev extra (pip install -e '.[dev]'), which make test installs"
    proc = subprocess.run([ruff, "check", "--no-cache", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


MAX_FUNCTION_LINES = 60  # issue 15: classification/ is small named steps (data, model, training, resume, loop)


def test_classification_functions_are_short() -> None:
    long = []
    for path in sorted((ROOT / "classification").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}() has {lines} lines")
    assert not long, f"split these into named steps of at most {MAX_FUNCTION_LINES} lines: {long}"


def _edits_sys_path(tree: ast.AST) -> list:
    """Lines that change ``sys.path`` (``sys.path.insert/append/extend/...``, ``sys.path[...] =``, ``sys.path =``)."""
    def is_sys_path(node: ast.AST) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                and node.value.id == "sys")

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and is_sys_path(node.func.value):
            found.append(node.lineno)
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if is_sys_path(t) or (isinstance(t, ast.Subscript) and is_sys_path(t.value)):
                    found.append(node.lineno)
    return sorted(found)


def test_no_sys_path_edits_outside_tests() -> None:
    """The tools run as ``python -m tools.NAME`` or console scripts of the installed package (issue 15)."""
    edits = []
    for path in sorted(ROOT.glob("**/*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", "outputs", "wheelhouse") or rel.parts[0].startswith("."):
            continue
        edits += [f"{rel}:{line}" for line in _edits_sys_path(ast.parse(path.read_text(), str(path)))]
    assert not edits, f"sys.path is changed here; import through the installed packages instead: {edits}"
    assert _edits_sys_path(ast.parse("import sys\nsys.path.insert(0, 'x')\nsys.path[:] = []\n")) == [2, 3]
