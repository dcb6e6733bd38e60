"""Which formulation an op runs: its kernels or its PyTorch reference.

Every op of ``defmamba.ops`` has a pure-PyTorch reference formulation (any device and dtype,
traceable, exportable) and kernels for CUDA tensors. :func:`use_kernels` is the one rule that
picks between them; two switches force the reference formulations for A/B measurements and
debugging:

* the environment variable ``DEFMAMBA_KERNELS=0`` (read when ``defmamba.ops`` is imported) forces
  them for every op, for the whole process, and ``DEFMAMBA_REFERENCE_OPS=layer_norm,depthwise_conv``
  for the ops it names (the names are :data:`OPS`);
* ``with defmamba.ops.reference_only():`` forces them inside the block, for every op, or only for
  the ops it names (``reference_only("depthwise_conv")``; the names are :data:`OPS`).

Forcing covers the selective scan's ``backend="auto"``, which then resolves to ``"torch"``; a
backend asked for by name (``backend="triton"``) is used as asked.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch

from . import triton_support

__all__ = ["ENV_VAR", "KERNEL_DTYPES", "OPS", "REFERENCE_OPS_VAR", "reference_forced", "reference_only",
           "runs_as_called", "use_kernels"]

ENV_VAR = "DEFMAMBA_KERNELS"
REFERENCE_OPS_VAR = "DEFMAMBA_REFERENCE_OPS"
OPS = ("channel_attention", "deformable_sampling", "depthwise_conv", "drop_path", "gelu_mlp", "layer_norm",
       "scan_orders", "selective_scan", "time_step_projection")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _reference_from_environment() -> frozenset[str]:
    value = os.environ.get(ENV_VAR, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{ENV_VAR}={value!r} is not understood: set {ENV_VAR}=0 to run every op's PyTorch "
                         f"reference formulation, or 1 (the default) for the kernels")
    if value == "0":
        return frozenset(OPS)
    named = [name.strip() for name in os.environ.get(REFERENCE_OPS_VAR, "").split(",") if name.strip()]
    unknown = sorted(set(named) - set(OPS))
    if unknown:
        raise ValueError(f"{REFERENCE_OPS_VAR} names unknown op {', '.join(map(repr, unknown))}; give a comma-separated "
                         f"list of {', '.join(OPS)}")
    return frozenset(named)


_reference: frozenset[str] = _reference_from_environment()  # ops forced to their reference formulation
_kernels_ready: Optional[bool] = None  # triton_support.is_available()[0], asked once per process


@contextlib.contextmanager
def reference_only(*ops: str) -> Iterator[None]:
    """Run the PyTorch reference formulation of the named ops (all ops if none is named) inside
    this block, whatever the tensors; see the module docstring."""
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise ValueError(f"reference_only: unknown op {', '.join(map(repr, unknown))}; the ops are "
                         f"{', '.join(map(repr, OPS))}")
    global _reference
    previous = _reference
    _reference = previous | frozenset(ops or OPS)
    try:
        yield
    finally:
        _reference = previous


def reference_forced(op: str) -> bool:
    """Whether ``op`` must run its reference formulation (``DEFMAMBA_KERNELS=0`` or :func:`reference_only`)."""
    return op in _reference


def use_kernels(op: str, *tensors: Optional[torch.Tensor]) -> bool:
    """Whether ``op`` runs its Triton kernels for ``tensors`` (``None`` entries are skipped): every
    tensor non-empty, on a CUDA device and float32/float16/bfloat16; Triton usable on this machine;
    the reference not forced; and neither ``torch.jit`` tracing nor an ONNX export under way (a
    traced graph, fvcore's FLOP count or ONNX, must record the reference's aten operators, and a
    Triton launch inside the tracer fails). Ops add their own conditions (layouts, dtype mixes)."""
    if op in _reference:
        return False
    for t in tensors:
        if t is not None and not (t.is_cuda and t.dtype in KERNEL_DTYPES):
            return False
    global _kernels_ready
    if _kernels_ready is None:  # asked only now: it initialises CUDA, which CPU-only use must not do
        _kernels_ready = triton_support.is_available()[0]
    # The ONNX exporters trace (torch.jit) or export (torch.export, which counts as compiling): the
    # costly ONNX check is only needed then.
    if (not _kernels_ready or torch.jit.is_tracing()
            or (torch.compiler.is_compiling() and torch.onnx.is_in_onnx_export())):
        return False
    for t in tensors:  # after the tracing check: a traced numel() is a tensor (and a TracerWarning)
        if t is not None and not t.numel():
            return False
    return True


def runs_as_called(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` does more than its ``forward``: hooks of its own or global module
    hooks, or a compiled forward. An op that would compute the module's result without calling it
    (fused with a neighbour) calls it instead then, so that hooks see what they always saw."""
    hooks = torch.nn.modules.module
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or getattr(module, "_compiled_call_impl", None) is not None
                or hooks._global_forward_hooks or hooks._global_forward_pre_hooks
                or hooks._global_backward_hooks or hooks._global_backward_pre_hooks)
