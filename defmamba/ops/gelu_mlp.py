"""The block's MLP ``fc2(GELU(fc1(x)))``, keeping only x and h = fc1(x) for the backward.

The MLP widens to 4·C channels; GELU's output is as large as h, and keeping both for the backward
is the largest single item of a block's activation memory. GELU is one elementwise pass, so the
backward recomputes it instead of storing it.

The backward of the hidden layer needs three things of the (rows, 4·C) map: GELU(h) again (for
fc2's weight gradient), the gradient of h, and that gradient's column sums (fc1's bias gradient).
As plain ops these are three passes (the recompute, ``gelu_backward`` and a reduction) that read
h twice and the gradient twice. For CUDA tensors one Triton kernel reads h and GELU's incoming
gradient once, writes GELU(h) and h's gradient, and sums each column of that gradient (as rounded
to its dtype) over its block of rows into one float32 partial row per program (elementwise per
tile, across the tile's rows once at the end), added up afterwards: four passes over the map
instead of six. The formulas are PyTorch's exact (erf) GELU and its derivative, evaluated in
float32 as PyTorch's kernels evaluate them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import triton_support
from .eager_dispatch import compile_aware
from .triton_support import IMPORT_ERROR, interpreting, tl, triton

__all__ = ["gelu_grad_and_column_sums", "gelu_grad_and_column_sums_triton", "gelu_mlp"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK_ROWS = 32  # rows per tile
_BLOCK_COLS = 128  # columns per tile
_ROWS_PER_PROGRAM = 512  # rows summed into one partial row (a multiple of _BLOCK_ROWS)


if triton is not None:

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


def _grad_triton(h: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cols = h.shape[-1]
    h2, grad2 = h.reshape(-1, cols), grad.reshape(-1, cols)
    rows = h2.shape[0]
    activation, grad_h = torch.empty_like(h2), torch.empty_like(h2)
    blocks = triton.cdiv(rows, _ROWS_PER_PROGRAM)
    sums = torch.empty((blocks, cols), dtype=torch.float32, device=h.device)
    grid = (blocks, triton.cdiv(cols, _BLOCK_COLS))
    _gelu_grad_kernel[grid](h2, grad2, activation, grad_h, sums, rows, cols, ROWS_PER_PROGRAM=_ROWS_PER_PROGRAM,
                            BLOCK_ROWS=_BLOCK_ROWS, BLOCK_COLS=_BLOCK_COLS, num_warps=4)
    return activation.view(h.shape), grad_h.view(h.shape), sums.sum(0)


@torch.library.custom_op("defmamba::gelu_grad_and_column_sums", mutates_args=())
def _grad_op(h: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _grad_triton(h, grad)


@_grad_op.register_fake
def _grad_fake(h, grad):
    return torch.empty_like(h), torch.empty_like(h), h.new_empty((h.shape[-1],), dtype=torch.float32)


_grad_fused = compile_aware(_grad_op, _grad_triton)


def _use_triton(h: torch.Tensor, grad: torch.Tensor) -> bool:
    return (h.is_cuda and h.dtype in _FLOATS and grad.dtype == h.dtype and grad.device == h.device
            and h.numel() > 0 and triton_support.ready())


def gelu_grad_and_column_sums(h: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For h and the gradient of GELU(h) (same shape, dtype and device): (GELU(h), the gradient of
    h, the sums of that gradient over every dimension but the last). The first two in h's dtype;
    the sums in float32 through the Triton kernel (CUDA tensors), in h's dtype through the plain
    ops that run anywhere else."""
    if h.shape != grad.shape or h.dtype != grad.dtype or h.device != grad.device:
        raise ValueError(f"gelu_grad_and_column_sums: h and grad must match in shape, dtype and device; got "
                         f"{tuple(h.shape)} {h.dtype} {h.device} and {tuple(grad.shape)} {grad.dtype} {grad.device}")
    if _use_triton(h, grad):
        return gelu_grad_and_column_sums_triton(h, grad)
    grad_h = torch.ops.aten.gelu_backward(grad, h)
    return F.gelu(h), grad_h, grad_h.reshape(-1, h.shape[-1]).sum(0)


def gelu_grad_and_column_sums_triton(h: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton route of :func:`gelu_grad_and_column_sums` (CUDA tensors, or CPU tensors under
    Triton's interpreter); the sums in float32."""
    if triton is None:
        raise RuntimeError(f"the Triton GELU gradient is not available: {IMPORT_ERROR}")
    if not h.is_cuda and not interpreting():
        raise RuntimeError(f"the Triton GELU gradient needs CUDA tensors; h is on {h.device}")
    return _grad_fused(h.contiguous(), grad.contiguous())


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class _GeluMlp(torch.autograd.Function):
    """Forward: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2) (under autocast both linears run in
    the autocast dtype, as nn.Linear's would). Backward: the products in the dtype of the incoming
    gradient, i.e. the forward's compute dtype, each gradient returned in its input's dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                b2: Optional[torch.Tensor]) -> torch.Tensor:
        h = F.linear(x, w1, b1)
        ctx.save_for_backward(x, h, w1, w2)
        ctx.bias_dtypes = (b1.dtype if b1 is not None else None, b2.dtype if b2 is not None else None)
        return F.linear(F.gelu(h), w2, b2)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, h, w1, w2 = ctx.saved_tensors
        b1_dtype, b2_dtype = ctx.bias_dtypes
        compute = grad_out.dtype
        grad_rows = _as_rows(grad_out)
        grad_activation = (grad_out @ w2.to(compute)).to(h.dtype)
        activation, grad_h, grad_b1 = gelu_grad_and_column_sums(h, grad_activation)
        grad_w2 = (grad_rows.t() @ _as_rows(activation).to(compute)).to(w2.dtype)
        grad_b2 = grad_rows.sum(0).to(b2_dtype) if b2_dtype is not None else None
        grad_h = grad_h.to(compute)
        grad_x = (grad_h @ w1.to(compute)).to(x.dtype)
        grad_w1 = (_as_rows(grad_h).t() @ _as_rows(x).to(compute)).to(w1.dtype)
        grad_b1 = grad_b1.to(b1_dtype) if b1_dtype is not None else None
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


def gelu_mlp(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor], fc2_weight: torch.Tensor,
             fc2_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(F.gelu(F.linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)``; when gradients
    are needed, only x and the hidden pre-activation are kept, and the backward of the hidden layer
    runs as one pass on CUDA (the plain ops run otherwise, e.g. for export and FLOP counting)."""
    tensors = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _GeluMlp.apply(*tensors)
    return F.linear(F.gelu(F.linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)
