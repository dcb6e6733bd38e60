"""What every Triton module of the project needs: the optional import and the availability checks.

Triton is optional: modules import ``triton``/``tl`` from here (``None`` when it is missing or
broken). :func:`is_available` says whether kernels can run on this machine (the op dispatch asks
it once, ``dispatch.py``), :func:`check_launch` makes a kernel entry's error clear.
"""
from __future__ import annotations

import os

import torch

__all__ = ["IMPORT_ERROR", "cdiv", "check_launch", "interpreting", "is_available", "next_power_of_2", "tl", "triton"]

try:
    import triton
    import triton.language as tl

    IMPORT_ERROR = ""
except Exception as err:  # noqa: BLE001  (ImportError, or a broken install raising anything)
    triton = None
    tl = None
    IMPORT_ERROR = f"triton could not be imported ({type(err).__name__}: {err})"


def cdiv(numerator: int, denominator: int) -> int:
    """⌈numerator / denominator⌉ for launch grids and block sizes, as ``triton.cdiv``.

    Plain integer arithmetic: Triton's own helpers are constexpr functions that cost a few µs per
    host call (several hundred per eager training step)."""
    return -(-numerator // denominator)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ≥ n (1 for n ≤ 1), as ``triton.next_power_of_2``, in plain Python."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


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


def check_launch(kernels: str, tensor: torch.Tensor) -> None:
    """Raise a clear error when the Triton ``kernels`` (their name, for the message) cannot run on
    ``tensor``: Triton is missing, or the tensor is not on a CUDA device (outside the interpreter)."""
    if triton is None:
        raise RuntimeError(f"the Triton {kernels} kernels are not available: {IMPORT_ERROR}")
    if not tensor.is_cuda and not interpreting():
        raise RuntimeError(f"the Triton {kernels} kernels need CUDA tensors; got a tensor on {tensor.device}")

