"""The block's MLP ``fc2(GELU(fc1(x)))``, keeping only x and h = fc1(x) for the backward.

The backward recomputes GELU(h) instead of storing it. The hidden layer's backward needs GELU(h),
the gradient of h and that gradient's column sums (fc1's bias gradient):
:func:`gelu_grad_and_column_sums` computes the three in one Triton kernel for CUDA tensors
(``triton.py``) and with the plain ops anywhere else (``reference.py``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..dispatch import use_kernels
from .reference import gelu_grad_and_column_sums_reference
from .triton import gelu_grad_and_column_sums_triton

__all__ = ["gelu_grad_and_column_sums", "gelu_mlp"]


def gelu_grad_and_column_sums(h: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For h and the gradient of GELU(h) (same shape, dtype and device): (GELU(h), the gradient of
    h, the sums of that gradient over every dimension but the last). The first two in h's dtype;
    the sums in float32 through the Triton kernel (CUDA tensors), in h's dtype through the plain
    ops that run anywhere else."""
    if h.shape != grad.shape or h.dtype != grad.dtype or h.device != grad.device:
        raise ValueError(f"gelu_grad_and_column_sums: h and grad must match in shape, dtype and device; got "
                         f"{tuple(h.shape)} {h.dtype} {h.device} and {tuple(grad.shape)} {grad.dtype} {grad.device}")
    if use_kernels("gelu_mlp", h):
        return gelu_grad_and_column_sums_triton(h, grad)
    return gelu_grad_and_column_sums_reference(h, grad)


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
