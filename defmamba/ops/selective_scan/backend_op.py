"""The custom-op wiring shared by the compiled scan backends (``cuda.py``, ``triton.py``).

Both forward kernels take (u, delta, A, B, C, D, delta_bias, delta_softplus, <output dtype>,
save_states, *options) and return (y, states); both backward kernels take (dy, u, delta, A, B, C,
D, delta_bias, states, delta_softplus, *options) and return the gradients of u, delta, A, B, C, D
and delta_bias in their inputs' dtypes, or buffers that the backend's ``unpack`` turns into them
(outside the custom op, whose outputs may not be views of one another). ``options`` are a
backend's own non-tensor arguments (none for cuda; ``A_is_log`` for triton), passed to both.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional

from ..kernel_op import kernel_op

__all__ = ["scan_kernel_op"]


def _setup_context(ctx, inputs, output) -> None:
    u, delta, A, B, C, D, delta_bias, delta_softplus, _out_dtype, _save_states, *options = inputs
    _y, states = output
    ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, states)
    ctx.backward_args = (delta_softplus, *options)  # the backward kernel's non-tensor arguments
    ctx.mark_non_differentiable(states)


def _backward(ctx, gradients: Callable, dy, _dstates, unpack: Optional[Callable] = None):
    u, delta, A, B, C, D, delta_bias, states = ctx.saved_tensors
    raw = gradients(dy, u, delta, A, B, C, D, delta_bias, states, *ctx.backward_args)
    du, ddelta, dA, dB, dC, dD, dbias = raw if unpack is None else unpack(raw, A, B, C, D, delta_bias)
    # none for delta_softplus, the output dtype, save_states and the options
    return (du, ddelta, dA, dB, dC, dD if D is not None else None, dbias if delta_bias is not None else None,
            *(None,) * (len(ctx.backward_args) + 2))


def scan_kernel_op(name: str, forward: Callable, forward_fake: Callable, gradients: Callable,
                   gradients_fake: Callable, unpack: Optional[Callable] = None) -> Callable:
    """:func:`defmamba.ops.kernel_op.kernel_op` for a scan backend's forward and backward kernels;
    ``unpack(raw, A, B, C, D, delta_bias)``, when given, makes the seven gradients of the backward
    kernel's raw outputs."""
    backward = _backward if unpack is None else partial(_backward, unpack=unpack)
    return kernel_op(name, forward, forward_fake, setup_context=_setup_context, backward=backward,
                     backward_impl=gradients, backward_fake=gradients_fake)
