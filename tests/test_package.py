"""Packaging contracts: the one-way import between the checkpoint loader and the model registry."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "defmamba"


def _defmamba_imports(module: str) -> set[str]:
    """The defmamba modules that ``module``'s source imports, at any depth of its code (function-level
    imports included); the package ``__init__`` files that Python runs on the way are not counted."""
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    if not path.is_file():
        path = path.with_suffix("") / "__init__.py"
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "defmamba"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "defmamba":
                continue
            for alias in node.names:  # `from . import name` may name a module
                candidate = f"{base}.{alias.name}"
                is_module = (PACKAGE.parent / (candidate.replace(".", "/") + ".py")).is_file()
                found.add(candidate if is_module else base)
    return found


def _closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo += sorted(_defmamba_imports(current) - seen)
    return seen - {module}


def test_checkpoint_loader_does_not_depend_on_the_models():
    reached = _closure("defmamba.checkpoint")
    assert "defmamba.variants" in reached
    assert not [m for m in reached if m.startswith("defmamba.models")], reached


def test_registry_depends_on_the_checkpoint_loader():
    reached = _closure("defmamba.models.registry")
    assert {"defmamba.checkpoint", "defmamba.variants"} <= reached
    assert "defmamba.models.registry" not in _closure("defmamba.checkpoint")


@pytest.mark.parametrize("module", ["defmamba.checkpoint", "defmamba.models.registry"])
def test_module_imports_first_in_a_fresh_interpreter(module):
    result = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
