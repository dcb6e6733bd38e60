"""Triton kernel of :func:`defmamba.ops.gelu_mlp.gelu_grad_and_column_sums` (CUDA tensors).

For h and the gradient of GELU(h): GELU(h) and h's gradient in h's dtype, and that gradient's
(rounded) column sums in float32, in one pass. The exact (erf) GELU and its derivative, evaluated
in float32 as PyTorch's kernels evaluate them.
"""
from __future__ import annotations

import torch

from ..kernel_op import kernel_op
from ..triton_launch import fast_launch
from ..triton_support import cdiv, check_launch, tl, triton

__all__ = ["gelu_grad_and_column_sums_triton"]

_BLOCK_ROWS = 32  # rows per tile
_BLOCK_COLS = 128  # columns per tile
_ROWS_PER_PROGRAM = 512  # rows summed into one partial row (a multiple of _BLOCK_ROWS)


if triton is not None:

    @fast_launch
    @triton.jit
    def _gelu_grad_kernel(h_ptr, grad_ptr, act_ptr, grad_h_ptr, sums_ptr, rows, cols,
                          ROWS_PER_PROGRAM: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        block = tl.program_id(0)
        col = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        col_ok = col < cols
        sqrt1_2: tl.constexpr = 0.7071067811865476  # 1/√2
        inv_sqrt_2pi: tl.constexpr = 0.3989422804014327  # 1/√(2π)
        col_sums = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)  # summed over the rows at the end
        first = block * ROWS_PER_PROGRAM
        for start in range(first, tl.minimum(first + ROWS_PER_PROGRAM, rows), BLOCK_ROWS):
            row = start + tl.arange(0, BLOCK_ROWS)
            ok = (row < rows)[:, None] & col_ok[None, :]
            offsets = row.to(tl.int64)[:, None] * cols + col[None, :]
            h = tl.load(h_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
            grad = tl.load(grad_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
            erf_term = 1.0 + tl.math.erf(h * sqrt1_2)
            tl.store(act_ptr + offsets, (h * 0.5 * erf_term).to(act_ptr.dtype.element_ty), mask=ok)
            slope = 0.5 * erf_term + h * (tl.exp(-0.5 * h * h) * inv_sqrt_2pi)
            grad_h = (grad * slope).to(grad_h_ptr.dtype.element_ty)
            tl.store(grad_h_ptr + offsets, grad_h, mask=ok)
            col_sums += grad_h.to(tl.float32)  # masked entries are 0
        tl.store(sums_ptr + block * cols + col, tl.sum(col_sums, axis=0), mask=col_ok)


def _forward(h: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cols = h.shape[-1]
    h2, grad2 = h.reshape(-1, cols), grad.reshape(-1, cols)
    rows = h2.shape[0]
    activation, grad_h = torch.empty_like(h2), torch.empty_like(h2)
    blocks = cdiv(rows, _ROWS_PER_PROGRAM)
    sums = torch.empty((blocks, cols), dtype=torch.float32, device=h.device)
    grid = (blocks, cdiv(cols, _BLOCK_COLS))
    _gelu_grad_kernel[grid](h2, grad2, activation, grad_h, sums, rows, cols, ROWS_PER_PROGRAM=_ROWS_PER_PROGRAM,
                            BLOCK_ROWS=_BLOCK_ROWS, BLOCK_COLS=_BLOCK_COLS, num_warps=4)
    return activation.view(h.shape), grad_h.view(h.shape), sums.sum(0)


def _forward_fake(h, grad):
    return torch.empty_like(h), torch.empty_like(h), h.new_empty((h.shape[-1],), dtype=torch.float32)


_op = kernel_op("gelu_grad_and_column_sums", _forward, _forward_fake)


def gelu_grad_and_column_sums_triton(h: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton route of :func:`defmamba.ops.gelu_mlp.gelu_grad_and_column_sums` (CUDA tensors, or
    CPU tensors under Triton's interpreter); the sums in float32."""
    check_launch("GELU gradient", h)
    return _op(h.contiguous(), grad.contiguous())
