"""CUDA backend of the selective scan: the compiled extension ``defmamba_scan_cuda``.

Build it with ``pip install ./kernels/selective_scan`` (or ``DEFMAMBA_BUILD_CUDA=1 pip install -e .``);
see kernels/selective_scan/README.md. This module imports without the extension or a GPU;
:func:`is_available` then says why it cannot run.

The kernels are the torch custom ops ``defmamba::selective_scan_cuda_fwd`` and ``_bwd`` under
torch.compile, and are called directly in eager mode (``backend_op.py``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..dispatch import KERNEL_DTYPES
from .backend_op import scan_kernel_op

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


def _forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
             delta_bias: Optional[Tensor], delta_softplus: bool, out_float32: bool,
             save_states: bool) -> tuple[Tensor, Tensor]:
    # The kernels index dense rows. Compiled graphs may hand the op other strides than eager code
    # does, so the layout is fixed here, where the real tensors are seen (a no-op when dense).
    u, delta, A, B, C, D, delta_bias = _dense(u, delta, A, B, C, D, delta_bias)
    y, states = _extension().fwd(u, delta, A, B, C, D, delta_bias, delta_softplus, out_float32, save_states)
    return y, states


def _forward_fake(u, delta, A, B, C, D, delta_bias, delta_softplus, out_float32, save_states):
    y = u.new_empty(u.shape, dtype=torch.float32 if out_float32 else u.dtype)
    batch, channels, length = u.shape
    shape = (batch, channels, -(-length // STATE_INTERVAL), STATES) if save_states else (0,)
    return y, u.new_empty(shape, dtype=torch.float32)


def _gradients(dy: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
               delta_bias: Optional[Tensor], states: Tensor,
               delta_softplus: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if states.numel() == 0:
        raise RuntimeError("selective_scan_cuda: the forward ran without saving states (no input required "
                           "grad), so it cannot be differentiated")
    if dy.dtype not in (u.dtype, torch.float32):
        dy = dy.float()
    u, delta, A, B, C, D, delta_bias, dy, states = _dense(u, delta, A, B, C, D, delta_bias, dy, states)
    du, ddelta, dA, dB, dC, dD, dbias = _extension().bwd(u, delta, A, B, C, D, delta_bias, delta_softplus, dy, states)
    return du, ddelta, dA, dB.to(B.dtype), dC.to(C.dtype), dD, dbias


def _gradients_fake(dy, u, delta, A, B, C, D, delta_bias, states, delta_softplus):
    f32 = torch.float32
    channels = u.shape[1]
    return (torch.empty_like(u), torch.empty_like(u), A.new_empty(A.shape, dtype=f32), B.new_empty(B.shape),
            C.new_empty(C.shape), u.new_empty((channels,) if D is not None else (0,), dtype=f32),
            u.new_empty((channels,) if delta_bias is not None else (0,), dtype=f32))


_scan = scan_kernel_op("selective_scan_cuda", _forward, _forward_fake, _gradients, _gradients_fake)


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
    if not dtypes <= set(KERNEL_DTYPES):
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
    y, _states = _scan(u, delta, A, B, C, D, delta_bias, bool(delta_softplus), out_float32, save_states)
    return y if y.dtype == out_dtype else y.to(out_dtype)
