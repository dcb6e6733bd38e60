"""Autocast's parameter casts, for a stage's blocks at once (and for the layers around the stages).

Under autocast every linear layer and convolution casts its float32 weight (and bias) to the
autocast dtype when it runs, and its backward casts the gradient back: a kernel launch per
parameter each way, 12 of the 27 parameters of a DM block, about 300 launches per training step of
DefMamba-T, and another 30 for the stem's, downsamples' and head's layers. In eager mode each launch
costs the host more than the cast costs the GPU.

:class:`ParameterCastGroup` casts named parameters of a module in one multi-tensor copy
(``torch._foreach_copy_``), runs the module (or a function of it) with the cast tensors in their
place, and casts their gradients back in one multi-tensor copy too. A cast is a cast: outputs and
gradients are the same, bit for bit, as with autocast's own per-layer casts, which then find the
tensors already in the autocast dtype.

It stands aside (the module runs as it is) without autocast, for parameters not in float32,
while torch.compile, ``torch.jit`` tracing or ONNX export record the model, and for modules with
compiled submodules, whose guards are set on the parameters they were compiled with.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

__all__ = ["ParameterCastGroup", "autocast_dtype_for", "cast_parameters"]


class _CastParameters(torch.autograd.Function):
    """(dtype, *params) → the params cast to dtype; backward casts the gradients back, both ways in
    multi-tensor copies."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.param_dtypes = [p.dtype for p in params]
        ctx.set_materialize_grads(False)  # an unused parameter's gradient stays None
        cast = _copy_as([p.detach() for p in params], [dtype] * len(params))
        ctx.mark_non_differentiable(*[c for p, c in zip(params, cast) if not p.requires_grad])
        return tuple(cast)

    @staticmethod
    def backward(ctx, *grads: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], ...]:
        present = [i for i, g in enumerate(grads) if g is not None]
        cast = _copy_as([grads[i] for i in present], [ctx.param_dtypes[i] for i in present])
        result: list[Optional[torch.Tensor]] = [None] * len(grads)
        for i, g in zip(present, cast):
            result[i] = g
        return (None, *result)


def _copy_as(tensors: Sequence[torch.Tensor], dtypes: Sequence[torch.dtype]) -> list[torch.Tensor]:
    """Each tensor converted to its dtype, with its strides; the dense ones of one source and one
    target dtype in one multi-tensor copy (a kernel launch per few dozen tensors on the GPU)."""
    out: list[Optional[torch.Tensor]] = [None] * len(tensors)
    groups: dict[tuple[torch.dtype, torch.dtype], list[int]] = {}
    for i, (t, dtype) in enumerate(zip(tensors, dtypes)):
        if t.dtype == dtype:
            out[i] = t
        elif _dense(t):
            groups.setdefault((t.dtype, dtype), []).append(i)
        else:
            out[i] = t.to(dtype)
    for (_, dtype), indices in groups.items():
        targets = [torch.empty_like(tensors[i], dtype=dtype) for i in indices]
        torch._foreach_copy_(targets, [tensors[i] for i in indices])
        for i, t in zip(indices, targets):
            out[i] = t
    return out  # type: ignore[return-value]


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense, so that ``empty_like`` gives it the same strides."""
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def autocast_dtype_for(params: Sequence[torch.Tensor], ancestors: Sequence[nn.Module] = ()) -> Optional[torch.dtype]:
    """The dtype autocast would cast ``params`` to now, or None where the grouped cast stands aside
    (module docstring; ``ancestors``: the modules whose compilation rules it out)."""
    if not params or torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return None
    device_type = params[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    dtype = torch.get_autocast_dtype(device_type)
    if dtype == torch.float32 or any(p.dtype != torch.float32 or p.device.type != device_type for p in params):
        return None
    if any(getattr(m, "_compiled_call_impl", None) is not None for m in ancestors):
        return None
    return dtype


def cast_parameters(dtype: torch.dtype, params: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``params`` cast to ``dtype`` in one multi-tensor copy, differentiable (the gradients are cast
    back the same way)."""
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        return _CastParameters.apply(dtype, *params)
    return tuple(_copy_as([p.detach() for p in params], [dtype] * len(params)))


class ParameterCastGroup:
    """Named parameters of ``root`` (dotted names relative to it) that :meth:`run` casts together.

    The modules holding them are looked up once, here; each run reads the parameters from them, so
    loading weights or moving the model is seen. A holder replaced later (a wrapper put around a
    layer) keeps its parameter cast in the group, which then only costs the cast.
    """

    def __init__(self, root: nn.Module, names: Sequence[str]) -> None:
        self.holders: list[tuple[nn.Module, str]] = []
        ancestors: dict[int, nn.Module] = {id(root): root}
        for name in names:
            path, _, leaf = name.rpartition(".")
            module = root
            for part in path.split(".") if path else ():
                module = module.get_submodule(part)
                ancestors.setdefault(id(module), module)
            if not isinstance(module._parameters.get(leaf), nn.Parameter):
                raise ValueError(f"{type(root).__name__} has no parameter {name!r}")
            self.holders.append((module, leaf))
        self.root = root
        self.names = list(names)
        self.ancestors = list(ancestors.values())

    def run(self, *args: Any) -> Any:
        """``root(*args)``, under autocast with the group's parameters cast in one go (module docstring)."""
        return self.call(self.root, *args)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` with the group's parameters cast in one go under autocast; ``fn`` runs (part
        of) ``root``, e.g. one of its methods."""
        params = [module._parameters.get(leaf) for module, leaf in self.holders]
        # a wrapper that moved the parameters elsewhere (FSDP's flat parameters): leave it to them
        dtype = None if any(p is None for p in params) else autocast_dtype_for(params, self.ancestors)
        if dtype is None:
            return fn(*args)
        cast = cast_parameters(dtype, params)
        try:
            for (module, leaf), tensor in zip(self.holders, cast):
                module._parameters[leaf] = tensor
            return fn(*args)
        finally:
            for (module, leaf), param in zip(self.holders, params):
                module._parameters[leaf] = param
