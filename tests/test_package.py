"""Packaging contracts: the torch floor checked at import and stated in pyproject.toml, and the
one-way import between the checkpoint loader and the model registry."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from defmamba import torch_version

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "defmamba"


MAJOR, MINOR = torch_version.MIN_TORCH
FLOOR = f"{MAJOR}.{MINOR}"


@pytest.mark.parametrize("found", [f"{MAJOR}.{MINOR - 1}.1", f"{MAJOR}.{MINOR - 1}.1+cu124", f"{MAJOR - 1}.13.0"])
def test_torch_older_than_the_floor_is_refused_with_the_fix(monkeypatch, found):
    monkeypatch.setattr(torch, "__version__", found)
    with pytest.raises(ImportError) as err:
        torch_version.check_torch_version()
    assert str(err.value) == f"defmamba needs torch>={FLOOR} (found {found}); upgrade with pip install -U torch"


@pytest.mark.parametrize("found", [f"{FLOOR}.0", f"{FLOOR}.0a0+git4f3c2b1", f"{MAJOR}.{MINOR + 4}.0+cpu",
                                   f"{MAJOR + 1}.0.0"])
def test_torch_at_or_above_the_floor_passes(monkeypatch, found):
    monkeypatch.setattr(torch, "__version__", found)
    torch_version.check_torch_version()  # e.g. "2.10" must not compare below "2.6" as strings do


def test_pyproject_states_the_same_torch_floor():
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_req = next(Requirement(r) for r in project["dependencies"] if Requirement(r).name == "torch")
    floors = [spec.version for spec in torch_req.specifier if spec.operator == ">="]
    assert floors == [FLOOR]


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


def test_build_backend_asks_for_ninja_only_when_it_compiles_the_extension(monkeypatch):
    import importlib.util

    kernel_dir = ROOT / "kernels" / "selective_scan"
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("DEFMAMBA_BUILD_CUDA", raising=False)
    spec = importlib.util.spec_from_file_location("defmamba_build_backend", kernel_dir / "_build_backend.py")
    backend = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(backend)
    for hook in ("get_requires_for_build_wheel", "get_requires_for_build_editable"):
        monkeypatch.setattr(backend._setuptools, hook, lambda config_settings=None: ["setuptools-own"])
    assert backend.get_requires_for_build_wheel() == ["setuptools-own"]  # the library, pure Python
    monkeypatch.setenv("DEFMAMBA_BUILD_CUDA", "1")
    assert backend.get_requires_for_build_editable() == ["setuptools-own", "ninja"]  # the library with the extension
    monkeypatch.delenv("DEFMAMBA_BUILD_CUDA")
    monkeypatch.chdir(kernel_dir)
    assert backend.get_requires_for_build_wheel() == ["setuptools-own", "ninja"]  # the extension package
