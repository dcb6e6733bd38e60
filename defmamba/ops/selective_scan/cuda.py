"""CUDA backend of the selective scan: the compiled extension ``defmamba_scan_cuda``.

Build it with ``pip install ./kernels/selective_scan`` (or ``DEFMAMBA_BUILD_CUDA=1 pip install -e .``);
see kernels/selective_scan/README.md. This module imports without the extension or a GPU;
:func:`is_available` then says why it cannot run.

The kernels are registered as the torch custom ops ``defmamba::selective_scan_cuda_fwd`` and
``defmamba::selective_scan_cuda_bwd`` (with fake implementations and autograd), so
``torch.compile(fullgraph=True)`` traces through :func:`selective_scan_cuda`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["is_available", "selective_scan_cuda"]

STATES = 16  # states per channel the kernels are compiled for; smaller N is zero-padded
STATE_INTERVAL = 64  # steps between the states the forward saves for the backward

try:
    import defmamba_scan_cuda as _ext
except ImportError as _err:
    _ext = None
    _IMPORT_ERROR = f"the compiled extension defmamba_scan_cuda is not installed ({_err})"
else:
    _IMPORT_ERROR = ""
    _built = (_ext.STATES, getattr(_ext, "STATE_INTERVAL", _ext.CHUNK))
    if _built != (STATES, STATE_INTERVAL):
        _IMPORT_ERROR = (f"the installed defmamba_scan_cuda was built from other sources (states, state interval "
                         f"{_built}; expected {(STATES, STATE_INTERVAL)}); rebuild it with "
                         "`pip install ./kernels/selective_scan`")
        _ext = None

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def is_available() -> tuple[bool, str]:
    """(True, "") when the extension is built and a CUDA GPU is visible, else (False, reason)."""
    if _ext is None:
        return False, _IMPORT_ERROR
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible to PyTorch"
    return True, ""


def _extension():
    if _ext is None:
        raise RuntimeError(f"CUDA selective scan unavailable: {_IMPORT_ERROR}; build it with "
                           "`pip install ./kernels/selective_scan`")
    return _ext


def _dense(*tensors: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    return tuple(t.contiguous() if t is not None else None for t in tensors)


@torch.library.custom_op("defmamba::selective_scan_cuda_fwd", mutates_args=(), device_types="cuda")
def _scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
              delta_bias: Optional[Tensor], delta_softplus: bool, out_float32: bool,
              save_states: bool) -> tuple[Tensor, Tensor]:
    # The kernels index dense rows. Compiled graphs may hand the op other strides than eager code
    # does, so the layout is fixed here, where the real tensors are seen (a no-op when dense).
    u, delta, A, B, C, D, delta_bias = _dense(u, delta, A, B, C, D, delta_bias)
    y, states = _extension().fwd(u, delta, A, B, C, D, delta_bias, delta_softplus, out_float32, save_states)
    return y, states


@_scan_fwd.register_fake
def _scan_fwd_fake(u, delta, A, B, C, D, delta_bias, delta_softplus, out_float32, save_states):
    y = u.new_empty(u.shape, dtype=torch.float32 if out_float32 else u.dtype)
    batch, channels, length = u.shape
    shape = (batch, channels, -(-length // STATE_INTERVAL), STATES) if save_states else (0,)
    return y, u.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("defmamba::selective_scan_cuda_bwd", mutates_args=(), device_types="cuda")
def _scan_bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
              delta_bias: Optional[Tensor], delta_softplus: bool, dy: Tensor,
              states: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    u, delta, A, B, C, D, delta_bias, dy, states = _dense(u, delta, A, B, C, D, delta_bias, dy, states)
    grads = _extension().bwd(u, delta, A, B, C, D, delta_bias, delta_softplus, dy, states)
    return tuple(grads)


@_scan_bwd.register_fake
def _scan_bwd_fake(u, delta, A, B, C, D, delta_bias, delta_softplus, dy, states):
    f32 = torch.float32
    channels = u.shape[1]
    return (torch.empty_like(u), torch.empty_like(u), A.new_empty(A.shape, dtype=f32),
            B.new_empty(B.shape, dtype=f32), C.new_empty(C.shape, dtype=f32),
            u.new_empty((channels,) if D is not None else (0,), dtype=f32),
            u.new_empty((channels,) if delta_bias is not None else (0,), dtype=f32))


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, delta_bias, delta_softplus, _out_float32, _save = inputs
    _y, states = output
    ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, states)
    ctx.delta_softplus = delta_softplus
    ctx.mark_non_differentiable(states)


def _backward(ctx, dy, _dstates):
    u, delta, A, B, C, D, delta_bias, states = ctx.saved_tensors
    if states.numel() == 0:
        raise RuntimeError("selective_scan_cuda: the forward ran without saving states (no input required "
                           "grad), so it cannot be differentiated")
    if dy.dtype not in (u.dtype, torch.float32):
        dy = dy.float()
    du, ddelta, dA, dB, dC, dD, dbias = _scan_bwd(u, delta, A, B, C, D, delta_bias, ctx.delta_softplus,
                                                 dy.contiguous(), states)
    return (du, ddelta, dA, dB.to(B.dtype), dC.to(C.dtype), dD if D is not None else None,
            dbias if delta_bias is not None else None, None, None, None)


_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def selective_scan_cuda(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Selective scan on the CUDA extension; same contract as :func:`defmamba.ops.selective_scan`.

    u, delta, B, C may be float32, float16 or bfloat16 (mixed dtypes run in float32); A, D and
    delta_bias are used in float32; N (A.shape[1]) must be at most 16. Differentiable in all inputs.
    """
    out_dtype = u.dtype if out_dtype is None else out_dtype
    dtypes = {u.dtype, delta.dtype, B.dtype, C.dtype}
    if not dtypes <= set(_FLOATS):
        raise TypeError(f"the CUDA selective scan takes float32/float16/bfloat16 u, delta, B, C; got "
                        f"{sorted(map(str, dtypes))} (use backend='torch' for float64)")
    compute = u.dtype if len(dtypes) == 1 else torch.float32
    n_state = A.shape[1]
    if n_state > STATES:
        raise ValueError(f"the CUDA selective scan supports N <= {STATES} states; got N={n_state} "
                         "(use backend='triton' or 'torch')")
    if n_state < STATES:
        pad = STATES - n_state
        A = F.pad(A, (0, pad))
        B = F.pad(B, (0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, pad))
    u, delta, B, C = (t.to(compute).contiguous() for t in (u, delta, B, C))
    A = A.float().contiguous()
    D = D.float().contiguous() if D is not None else None
    delta_bias = delta_bias.float().contiguous() if delta_bias is not None else None
    out_float32 = out_dtype != compute
    inputs = (u, delta, A, B, C, D, delta_bias)
    save_states = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    y, _states = _scan_fwd(u, delta, A, B, C, D, delta_bias, bool(delta_softplus), out_float32, save_states)
    return y if y.dtype == out_dtype else y.to(out_dtype)
