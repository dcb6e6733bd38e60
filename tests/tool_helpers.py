"""Loading a script of tools/ as a module in the tests (the scripts are not part of the package)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str) -> ModuleType:
    """tools/<name>.py, executed as a fresh module named defmamba_tool_<name>, with tools/ on the
    import path as when Python runs the script (so it finds its neighbour modules, e.g. benchmark_helpers)."""
    spec = importlib.util.spec_from_file_location(f"defmamba_tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(TOOLS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(TOOLS))
    return module
