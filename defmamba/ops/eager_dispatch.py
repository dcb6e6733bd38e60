"""Calling a kernel op in eager mode without the custom-op dispatch, and through it under torch.compile.

The Triton ops are ``torch.library`` custom ops so that ``torch.compile`` sees them as opaque
nodes with fake (shape-only) implementations. A custom op's Python dispatch costs tens of
microseconds per call, though, and a training step of DefMamba calls these ops about a hundred
times, on a GPU that is then waiting for the host. In eager mode the same implementation is
therefore called directly, wrapped in a plain ``autograd.Function`` that uses the op's own
``setup_context`` and backward, so both routes compute exactly the same thing.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["compile_aware", "with_autograd"]


def compile_aware(op: Callable, impl: Callable) -> Callable:
    """``op(*args)`` while torch.compile traces, ``impl(*args)`` otherwise."""

    def call(*args: Any) -> Any:
        return op(*args) if torch.compiler.is_compiling() else impl(*args)

    return call


def with_autograd(impl: Callable, setup_context: Callable, backward: Callable) -> Callable:
    """``impl`` made differentiable with a custom op's ``setup_context(ctx, inputs, output)`` and
    ``backward(ctx, *grads)``; without any input that needs a gradient, ``impl`` is called as is."""

    class _Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = impl(*inputs)
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    def call(*inputs: Any) -> Any:
        if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
            return _Function.apply(*inputs)
        return impl(*inputs)

    return call
