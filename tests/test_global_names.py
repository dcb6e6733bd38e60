"""Every global name a library function reads exists in its module: a helper moved or renamed
elsewhere fails here on CPU, not first on the GPU path that calls it."""
from __future__ import annotations

import builtins
import dis
import importlib
import pkgutil
import types

import pytest

import defmamba

OPTIONAL = ("defmamba.mm", "defmamba.train")   # need the mm / train extras


def _modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(defmamba.__path__, prefix="defmamba."):
        names.append(info.name)
    return sorted(names)


def _global_reads(code: types.CodeType):
    for instruction in dis.get_instructions(code):
        if instruction.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
            yield instruction.argval
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _global_reads(const)


@pytest.mark.parametrize("name", _modules())
def test_functions_read_only_names_their_module_defines(name):
    try:
        module = importlib.import_module(name)
    except ImportError as err:
        if name.startswith(OPTIONAL):
            pytest.skip(f"{name}: {err}")
        raise
    source = getattr(module, "__file__", None)
    if source is None:
        pytest.skip("namespace package")
    with open(source, encoding="utf-8") as f:
        code = compile(f.read(), source, "exec")
    # Module-level code already ran at import; the functions' reads run only when called.
    functions = [c for c in code.co_consts if isinstance(c, types.CodeType)]
    missing = sorted({n for f in functions for n in _global_reads(f)
                      if n not in vars(module) and not hasattr(builtins, n) and n != "__file__"})
    assert not missing, f"{name} reads undefined globals: {missing}"
