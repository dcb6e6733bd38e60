"""Selective scan with three interchangeable backends: ``cuda`` (compiled extension),
``triton`` (JIT kernels, no build step) and ``torch`` (pure PyTorch reference).

``backend="auto"`` picks the first available of cuda → triton → torch for the inputs' device,
logs the choice once, and can be overridden with the environment variable
``DEFMAMBA_SCAN_BACKEND``; it is "torch" wherever the reference formulations are forced
(``DEFMAMBA_KERNELS=0``, :func:`defmamba.ops.reference_only`). Asking by name for a backend that
cannot run is an error that says how to make it available.
"""
from __future__ import annotations

import importlib
import logging
import os
from typing import Callable, Optional

import torch

from ..dispatch import reference_forced
from .reference import selective_scan_torch

__all__ = ["selective_scan", "resolve_backend", "available_backends", "BACKENDS"]

_log = logging.getLogger(__name__)

BACKENDS = ("cuda", "triton", "torch")
ENV_VAR = "DEFMAMBA_SCAN_BACKEND"

# name -> (module, function, how to get it)
_BACKEND_SOURCES = {
    "cuda": (
        "defmamba.ops.selective_scan.cuda",
        "selective_scan_cuda",
        "build the CUDA extension with `pip install ./kernels/selective_scan` "
        "(or `DEFMAMBA_BUILD_CUDA=1 pip install -e .`) on a machine with nvcc and a CUDA GPU",
    ),
    "triton": (
        "defmamba.ops.selective_scan.triton",
        "selective_scan_triton",
        "install Triton (`pip install triton`, Linux) and run on a CUDA GPU",
    ),
}
_announced: set = set()


# Loaded once per process: traced code (torch.compile) then only reads this dict and never
# reaches importlib, which would break the graph.
_loaded: dict[str, tuple[Optional[Callable], str]] = {"torch": (selective_scan_torch, "")}


def _import_backend(name: str) -> tuple[Optional[Callable], str]:
    module_name, fn_name, how = _BACKEND_SOURCES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        return None, f"{err}; to enable it, {how}"
    ok, why = module.is_available()
    if not ok:
        return None, f"{why}; to enable it, {how}"
    return getattr(module, fn_name), ""


def _load_backend(name: str) -> tuple[Optional[Callable], str]:
    """Return (function, "") if backend ``name`` can run on this machine, else (None, reason)."""
    if name not in _loaded:
        _loaded[name] = _import_backend(name)
    return _loaded[name]


if torch.cuda.is_available():  # resolve the GPU backends up front, outside any traced region
    for _name in ("cuda", "triton"):
        _load_backend(_name)


def available_backends(device: torch.device | str = "cuda") -> list[str]:
    """Backends that can run on ``device``, in the order ``auto`` tries them."""
    device = torch.device(device)
    if device.type != "cuda":
        return ["torch"]
    return [name for name in BACKENDS if _load_backend(name)[0] is not None]


def resolve_backend(backend: str, device: torch.device) -> tuple[str, Callable]:
    """Map a requested backend ("auto" or a name) to (name, function) for ``device``."""
    if backend == "auto" and reference_forced("selective_scan"):
        return "torch", selective_scan_torch
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        source = f"{ENV_VAR}={backend}"
    else:
        source = f"backend={backend!r}"
    if backend not in BACKENDS and backend != "auto":
        raise ValueError(f"unknown selective-scan backend from {source}; choose one of 'auto', {', '.join(map(repr, BACKENDS))}")
    if backend == "auto":
        candidates = BACKENDS if device.type == "cuda" else ("torch",)
        for name in candidates:
            fn, _ = _load_backend(name)
            if fn is not None:
                if not torch.compiler.is_compiling() and (name, device.type) not in _announced:
                    _announced.add((name, device.type))
                    _log.info("selective scan: using the %s backend on %s", name, device.type)
                return name, fn
        raise AssertionError("unreachable: the torch backend always loads")
    if backend != "torch" and device.type != "cuda":
        raise RuntimeError(
            f"selective-scan backend {backend!r} ({source}) needs CUDA tensors, got tensors on {device}; "
            "use backend='torch' (or 'auto') for CPU inputs")
    fn, why = _load_backend(backend)
    if fn is None:
        raise RuntimeError(f"selective-scan backend {backend!r} ({source}) is not available: {why}")
    return backend, fn


def _check_inputs(u, delta, A, B, C, D, delta_bias) -> None:
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (batch, channels, L); got {tuple(u.shape)} and {tuple(delta.shape)}")
    batch, channels, length = u.shape
    if A.dim() != 2 or A.shape[0] != channels:
        raise ValueError(f"A must be (channels={channels}, N); got {tuple(A.shape)}")
    n_state = A.shape[1]
    if B.dim() != 4 or B.shape[0] != batch or B.shape[2] != n_state or B.shape[3] != length:
        raise ValueError(f"B must be (batch={batch}, K, N={n_state}, L={length}); got {tuple(B.shape)}")
    if C.shape != B.shape:
        raise ValueError(f"C must have B's shape {tuple(B.shape)}; got {tuple(C.shape)}")
    if channels % B.shape[1]:
        raise ValueError(f"channels ({channels}) must be a multiple of the number of B/C groups K={B.shape[1]}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (channels,):
            raise ValueError(f"{name} must be ({channels},); got {tuple(t.shape)}")
    floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        if t.dtype not in floats:
            raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64); got {t.dtype}")
    if length == 0:
        raise ValueError("the sequence length L must be at least 1")


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    out_dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
    A_is_log: bool = False,
) -> torch.Tensor:
    """Mamba selective scan with B/C shared per group of channels.

    Args:
        u, delta: (batch, K·Dg, L) inputs and time steps (float32, float16, bfloat16 or float64).
        A: (K·Dg, N) state matrix (diagonal per channel; A ≤ 0 in the model), or its logs (A_is_log).
        B, C: (batch, K, N, L) input and output projections; channel c uses group c // Dg.
        D: optional (K·Dg,) skip coefficient; delta_bias: optional (K·Dg,) added to delta.
        delta_softplus: apply softplus to delta + delta_bias.
        out_dtype: dtype of y (default: u's dtype). The state is always float32 or wider.
        backend: "auto", "cuda", "triton" or "torch".
        A_is_log: A holds log(−A) (the model's A_logs, (K·Dg, N)); the scan uses A = −exp(A), and
            the gradient is taken with respect to the logs. The exponential is taken in float32
            (float64 for float64 A): inside the triton kernels, before the call for the others.

    Returns:
        y: (batch, K·Dg, L).
    """
    _check_inputs(u, delta, A, B, C, D, delta_bias)
    name, fn = resolve_backend(backend, u.device)
    if name == "triton":
        return fn(u, delta, A, B, C, D, delta_bias, delta_softplus, out_dtype, A_is_log=A_is_log)
    if A_is_log:
        A = -torch.exp(A if A.dtype == torch.float64 else A.float())
    return fn(u, delta, A, B, C, D, delta_bias, delta_softplus, out_dtype)
