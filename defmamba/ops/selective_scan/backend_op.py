"""The custom-op wiring shared by the compiled scan backends (``cuda.py``, ``triton.py``).

Both forward kernels take (u, delta, A, B, C, D, delta_bias, delta_softplus, <output dtype>,
save_states) and return (y, states); both backward kernels take (dy, u, delta, A, B, C, D,
delta_bias, states, delta_softplus) and return the gradients of u, delta, A, B, C, D and
delta_bias in their inputs' dtypes, or buffers that the backend's ``unpack`` turns into them
(outside the custom op, whose outputs may not be views of one another).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional

from ..kernel_op import kernel_op

__all__ = ["scan_kernel_op"]


def _setup_context(ctx, inputs, output) -> None:
    u, delta, A, B, C, D, delta_bias, delta_softplus, _out_dtype, _save_states = inputs
    _y, states = output
    ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, states)
    ctx.delta_softplus = delta_softplus
    ctx.mark_non_differentiable(states)


def _backward(ctx, gradients: Callable, dy, _dstates, unpack: Optional[Callable] = None):
    u, delta, A, B, C, D, delta_bias, states = ctx.saved_tensors
    raw = gradients(dy, u, delta, A, B, C, D, delta_bias, states, ctx.delta_softplus)
    du, ddelta, dA, dB, dC, dD, dbias = raw if unpack is None else unpack(raw, A, B, C, D, delta_bias)
    return (du, ddelta, dA, dB, dC, dD if D is not None else None, dbias if delta_bias is not None else None,
            None, None, None)


def scan_kernel_op(name: str, forward: Callable, forward_fake: Callable, gradients: Callable,
                   gradients_fake: Callable, unpack: Optional[Callable] = None) -> Callable:
    """:func:`defmamba.ops.kernel_op.kernel_op` for a scan backend's forward and backward kernels;
    ``unpack(raw, A, B, C, D, delta_bias)``, when given, makes the seven gradients of the backward
    kernel's raw outputs."""
    backward = _backward if unpack is None else partial(_backward, unpack=unpack)
    return kernel_op(name, forward, forward_fake, setup_context=_setup_context, backward=backward,
                     backward_impl=gradients, backward_fake=gradients_fake)
