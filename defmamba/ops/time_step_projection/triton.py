"""Triton kernel of :func:`defmamba.ops.time_step_projection.project_time_steps`.

Δ = W_k · dt for weight (K, D, R) and dt (B, K, R, L) of one float dtype: a tensor-core dot over
the rank per [D, L] tile, accumulated in float32 (IEEE float32 products for float32 inputs), the
result (B, K, D, L) in the inputs' dtype. The backward is two matmuls.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..kernel_op import kernel_op
from ..triton_launch import fast_launch
from ..triton_support import cdiv, check_launch, next_power_of_2, tl, triton

__all__ = ["project_time_steps_triton"]


if triton is not None:

    @fast_launch
    @triton.jit
    def _projection_kernel(w_ptr, dt_ptr, out_ptr, channels, rank, length_over_align, dt_stride_over_align, scans,
                           ALIGN: tl.constexpr, RANK_POW2: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_L: tl.constexpr, IEEE: tl.constexpr):
        length = length_over_align * ALIGN  # L, known to the compiler as a multiple of ALIGN
        dt_stride = dt_stride_over_align * ALIGN  # from one (image, scan)'s dt rows to the next
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
        x = tl.load(dt_ptr + image_scan * dt_stride + r[:, None] * length + l[None, :],
                    mask=r_ok[:, None] & l_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(w, x, input_precision="ieee")
        else:
            acc = tl.dot(w, x)
        tl.store(out_ptr + (image_scan * channels + d[:, None]) * length + l[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=d_ok[:, None] & l_ok[None, :])


def _alignment(length: int) -> int:
    """The largest power of two dividing L, at most 8."""
    return min(8, length & -length)


def _forward(weight: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    # the layout is checked here, in the op's implementation, so that the rule holds for whatever
    # strides reach it (under torch.compile, those Inductor gives the custom op's input)
    dt = _rows_in_place(dt)
    batch, scans, rank, length = dt.shape
    channels = weight.shape[1]
    out = torch.empty((batch, scans, channels, length), dtype=dt.dtype, device=dt.device)
    align = _alignment(length)
    block_l = min(128, max(16, next_power_of_2(length)))
    block_d = 32 if rank <= 16 else 64
    grid = (cdiv(length, block_l), cdiv(channels, block_d), batch * scans)
    _projection_kernel[grid](weight, dt, out, channels, rank, length // align, dt.stride(1) // align, scans,
                             ALIGN=align, RANK_POW2=max(16, next_power_of_2(rank)), BLOCK_D=block_d,
                             BLOCK_L=block_l, IEEE=dt.dtype == torch.float32, num_warps=4)
    return out


def _forward_fake(weight, dt):
    batch, scans, _, length = dt.shape
    return dt.new_empty((batch, scans, weight.shape[1], length))


def _gradients(grad: torch.Tensor, weight: torch.Tensor, dt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of the weight and of dt, as torch.matmul's backward computes them."""
    grad_dt = torch.matmul(weight.transpose(1, 2), grad)  # (K, R, D) @ (B, K, D, L)
    grad_weight = torch.matmul(grad, dt.transpose(2, 3)).sum(0)  # Σ_b (B, K, D, L) @ (B, K, L, R)
    return grad_weight, grad_dt


def _gradients_fake(grad, weight, dt):
    return grad.new_empty(weight.shape), grad.new_empty(dt.shape)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, gradients: Callable, grad: torch.Tensor):
    weight, dt = ctx.saved_tensors
    return gradients(grad, weight, dt)


_projection = kernel_op("time_step_projection", _forward, _forward_fake, setup_context=_setup_context,
                        backward=_backward, backward_impl=_gradients, backward_fake=_gradients_fake)


def _rows_in_place(dt: torch.Tensor) -> torch.Tensor:
    """dt as it is when the kernel can read it in place: each (image, scan)'s R rows of L contiguous,
    the (image, scan) blocks evenly spaced by a multiple of the kernel's alignment. The DSSM's dt is
    such a view (the first R rows of each (R+2N)-row block of its x_proj output), read without a copy.
    Any other layout is copied."""
    batch, scans, rank, length = dt.shape
    in_place = (dt.stride(3) == 1 and (rank == 1 or dt.stride(2) == length)
                and (batch == 1 or dt.stride(0) == scans * dt.stride(1))
                and dt.stride(1) >= rank * length and dt.stride(1) % _alignment(length) == 0)
    return dt if in_place else dt.contiguous()


def project_time_steps_triton(weight: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """The Triton route of :func:`defmamba.ops.time_step_projection.project_time_steps` (shapes checked
    there; one dtype, CUDA tensors, or CPU tensors under Triton's interpreter). dt may be a view
    (:func:`_rows_in_place`)."""
    check_launch("time-step projection", dt)
    return _projection(weight.contiguous(), dt)
