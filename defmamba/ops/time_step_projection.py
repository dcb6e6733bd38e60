"""The DSSM's per-scan time-step projection Δ = W_k · dt: (K, D, R) × (B, K, R, L) → (B, K, D, L).

The rank R is small (⌈C/16⌉: 6 to 48), so the product is a memory-bound write of the (B, K, D, L)
result. cuBLAS's batched GEMM reaches only a third to a half of the write floor on these shapes,
less in bfloat16 and where a row of L elements is not a multiple of 8 (14 × 14 = 196), and the
forward of every block pays for it.

For CUDA tensors the forward is one Triton kernel: a program computes a [BLOCK_D, BLOCK_L] tile of
one (image, scan) pair with a single tensor-core dot over the rank (padded to 16), accumulating in
float32 (IEEE float32 products for float32 inputs), and the kernel is told the largest power of
two up to 8 that divides L, so that its stores are vectorised where the rows allow it. The backward
is two matmuls: dt's gradient Wᵀ·g and W's Σ_b g·dtᵀ, as torch.matmul's backward computes them.

Under autocast the op follows torch.matmul's rule: both inputs in the autocast dtype, the result
in it too.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import triton_support
from .eager_dispatch import compile_aware, with_autograd
from .triton_support import IMPORT_ERROR, interpreting, tl, triton

__all__ = ["project_time_steps"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


if triton is not None:

    @triton.jit
    def _projection_kernel(w_ptr, dt_ptr, out_ptr, channels, rank, length_over_align, scans,
                           ALIGN: tl.constexpr, RANK_POW2: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_L: tl.constexpr, IEEE: tl.constexpr):
        length = length_over_align * ALIGN  # L, known to the compiler as a multiple of ALIGN
        l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        image_scan = tl.program_id(2).to(tl.int64)  # b · K + k
        k = image_scan % scans
        r = tl.arange(0, RANK_POW2)
        d_ok = d < channels
        l_ok = l < length
        r_ok = r < rank
        w = tl.load(w_ptr + (k * channels + d[:, None]) * rank + r[None, :], mask=d_ok[:, None] & r_ok[None, :],
                    other=0.0)
        x = tl.load(dt_ptr + (image_scan * rank + r[:, None]) * length + l[None, :],
                    mask=r_ok[:, None] & l_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(w, x, input_precision="ieee")
        else:
            acc = tl.dot(w, x)
        tl.store(out_ptr + (image_scan * channels + d[:, None]) * length + l[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=d_ok[:, None] & l_ok[None, :])


def _forward(weight: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    batch, scans, rank, length = dt.shape
    channels = weight.shape[1]
    out = torch.empty((batch, scans, channels, length), dtype=dt.dtype, device=dt.device)
    align = min(8, length & -length)  # largest power of two dividing L, at most 8
    block_l = min(128, max(16, triton.next_power_of_2(length)))
    block_d = 32 if rank <= 16 else 64
    grid = (triton.cdiv(length, block_l), triton.cdiv(channels, block_d), batch * scans)
    _projection_kernel[grid](weight, dt, out, channels, rank, length // align, scans,
                             ALIGN=align, RANK_POW2=max(16, triton.next_power_of_2(rank)), BLOCK_D=block_d,
                             BLOCK_L=block_l, IEEE=dt.dtype == torch.float32, num_warps=4)
    return out


def _backward(grad: torch.Tensor, weight: torch.Tensor, dt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grad_dt = torch.matmul(weight.transpose(1, 2), grad)  # (K, R, D) @ (B, K, D, L)
    grad_weight = torch.matmul(grad, dt.transpose(2, 3)).sum(0)  # Σ_b (B, K, D, L) @ (B, K, L, R)
    return grad_weight, grad_dt


# ---- torch custom op: opaque to torch.compile, differentiable through register_autograd ----

@torch.library.custom_op("defmamba::time_step_projection_fwd", mutates_args=())
def _fwd_op(weight: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    return _forward(weight, dt)


@_fwd_op.register_fake
def _fwd_fake(weight, dt):
    batch, scans, _, length = dt.shape
    return dt.new_empty((batch, scans, weight.shape[1], length))


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _autograd_backward(backward: Callable) -> Callable:
    def run(ctx, grad):
        weight, dt = ctx.saved_tensors
        return backward(grad, weight, dt)

    return run


_fwd_op.register_autograd(_autograd_backward(_backward), setup_context=_setup_context)
# Eager mode calls the kernel without the custom-op dispatch (eager_dispatch.py).
_fwd = compile_aware(_fwd_op, with_autograd(_forward, _setup_context, _autograd_backward(_backward)))


def _use_triton(weight: torch.Tensor, dt: torch.Tensor) -> bool:
    return (dt.is_cuda and dt.dtype in _FLOATS and weight.dtype == dt.dtype and weight.device == dt.device
            and dt.numel() > 0 and weight.shape[1] > 0 and triton_support.ready())


def project_time_steps(weight: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """``torch.matmul(weight, dt)`` for weight (K, D, R) and dt (B, K, R, L): the time steps (B, K, D, L).

    CUDA tensors of one float dtype run the Triton kernel, anything else torch.matmul.
    Differentiable in both inputs."""
    if weight.dim() != 3 or dt.dim() != 4 or dt.shape[1] != weight.shape[0] or dt.shape[2] != weight.shape[2]:
        raise ValueError(f"project_time_steps: weight must be (K, D, R) and dt (B, K, R, L); got {tuple(weight.shape)} "
                         f"and {tuple(dt.shape)}")
    device_type = dt.device.type
    if torch.is_autocast_enabled(device_type):  # torch.matmul's autocast rule, applied before the kernel
        dtype = torch.get_autocast_dtype(device_type)
        weight, dt = weight.to(dtype), dt.to(dtype)
    if not _use_triton(weight, dt):
        return torch.matmul(weight, dt)
    return project_time_steps_triton(weight, dt)


def project_time_steps_triton(weight: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """The Triton route of :func:`project_time_steps` (shapes checked there; one dtype, CUDA
    tensors, or CPU tensors under Triton's interpreter)."""
    if triton is None:
        raise RuntimeError(f"the Triton time-step projection is not available: {IMPORT_ERROR}")
    if not dt.is_cuda and not interpreting():
        raise RuntimeError(f"the Triton time-step projection needs CUDA tensors; dt is on {dt.device}")
    return _fwd(weight.contiguous(), dt.contiguous())
