"""A kernel as an op: a ``torch.library`` custom op under torch.compile, a direct call in eager mode.

:func:`kernel_op` registers the kernel's implementation as the custom op ``defmamba::<name>``
(``<name>_fwd`` and ``<name>_bwd`` for a differentiable op), with fake (shape-only)
implementations, so that torch.compile sees an opaque node. In eager mode the returned function
calls the implementation directly, inside a plain ``autograd.Function`` when an input needs a
gradient, with the same ``setup_context`` and backward: both routes compute the same thing, and
eager mode skips the custom-op dispatch (docs/ops.md).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

__all__ = ["kernel_op"]


def kernel_op(name: str, impl: Callable, fake: Callable, *, setup_context: Optional[Callable] = None,
              backward: Optional[Callable] = None, backward_impl: Optional[Callable] = None,
              backward_fake: Optional[Callable] = None) -> Callable:
    """The op ``impl`` (type-annotated: its annotations are the custom op's schema) with the fake
    implementation ``fake`` (same arguments, outputs of the right shapes, dtypes and strides).

    A differentiable op also takes ``setup_context(ctx, inputs, output)`` (as for
    ``torch.library.register_autograd``), the backward kernel ``backward_impl`` with its fake
    ``backward_fake``, and ``backward(ctx, kernel, *grads)``, which returns one gradient (or None)
    per input and computes them with ``kernel``: ``backward_impl`` in eager mode, its custom op
    under torch.compile. In eager mode the gradient of an output that got none (one marked
    non-differentiable in ``setup_context``) reaches ``backward`` as None, not as a zero tensor.

    Returns ``call(*args)``: the custom op while torch.compile traces, ``impl(*args)`` otherwise
    (through the ``autograd.Function`` when grad mode is on and a tensor argument requires grad).
    """
    if backward is None:
        op = _custom_op(name, impl, fake)

        def call(*args: Any) -> Any:
            return op(*args) if torch.compiler.is_compiling() else impl(*args)

        return call

    op = _custom_op(f"{name}_fwd", impl, fake)
    backward_op = _custom_op(f"{name}_bwd", backward_impl, backward_fake)
    op.register_autograd(lambda ctx, *grads: backward(ctx, backward_op, *grads), setup_context=setup_context)

    def forward_with_context(ctx, *args):
        output = impl(*args)
        setup_context(ctx, args, output)
        # Outputs without a gradient (the non-differentiable statistics or states an op keeps)
        # reach ``backward`` as None, not as zero tensors the engine would fill: a kernel each.
        ctx.set_materialize_grads(False)
        return output

    def backward_with_kernel(ctx, *grads):
        return backward(ctx, backward_impl, *grads)

    # Named after the op, so that profiler traces and autograd graphs show which op a node is
    # (``<name>Backward``), not one anonymous class for every op.
    function = type(name, (torch.autograd.Function,), {"forward": staticmethod(forward_with_context),
                                                       "backward": staticmethod(backward_with_kernel)})
    apply = function.apply

    def call(*args: Any) -> Any:
        if torch.compiler.is_compiling():
            return op(*args)
        if torch.is_grad_enabled():
            for arg in args:
                if isinstance(arg, torch.Tensor) and arg.requires_grad:
                    return apply(*args)
        return impl(*args)

    return call


def _custom_op(name: str, impl: Callable, fake: Callable) -> Callable:
    op = torch.library.custom_op(f"defmamba::{name}", impl, mutates_args=())
    op.register_fake(fake)
    return op
