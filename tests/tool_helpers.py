"""Loading a script of tools/ as a module in the tests (the scripts are not part of the package)."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str) -> ModuleType:
    """tools/<name>.py, executed as a fresh module named defmamba_tool_<name>."""
    spec = importlib.util.spec_from_file_location(f"defmamba_tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
