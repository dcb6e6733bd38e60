"""What every Triton module of the project needs: the optional import and the availability check.

Triton is optional: modules import ``triton``/``tl`` from here (``None`` when it is missing or
broken) and ask :func:`is_available` / :func:`ready` before launching a kernel on CUDA tensors.
"""
from __future__ import annotations

import os

import torch

__all__ = ["IMPORT_ERROR", "interpreting", "is_available", "ready", "tl", "triton"]

try:
    import triton
    import triton.language as tl

    IMPORT_ERROR = ""
except Exception as err:  # noqa: BLE001  (ImportError, or a broken install raising anything)
    triton = None
    tl = None
    IMPORT_ERROR = f"triton could not be imported ({type(err).__name__}: {err})"


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1``: kernels then run on CPU tensors (for tests and debugging)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_available() -> tuple[bool, str]:
    """(True, "") when Triton kernels can run on CUDA tensors here, else (False, why not)."""
    if triton is None:
        return False, IMPORT_ERROR
    if interpreting():
        return False, "TRITON_INTERPRET=1 is set (the interpreter is for debugging on CPU tensors only)"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False)"
    major, minor = torch.cuda.get_device_capability()
    if major < 7:
        return False, f"the GPU has compute capability {major}.{minor}; Triton needs 7.0 or newer"
    return True, ""


_ready: bool | None = None


def ready() -> bool:
    """Whether the op dispatch may launch Triton kernels now: ``is_available()[0]`` (asked once per
    process), and not while ``torch.jit`` traces or ONNX exports the model. Those must see the
    PyTorch formulations: a traced graph (fvcore's FLOP count, ONNX) records aten operators, and a
    Triton launch inside the tracer fails to compile."""
    global _ready
    if _ready is None:
        _ready = is_available()[0]
    return _ready and not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export()
