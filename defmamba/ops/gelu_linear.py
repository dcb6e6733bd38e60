"""``linear(GELU(h))`` that keeps only h for the backward and recomputes GELU(h) there.

The MLP of every block widens to 4·C channels; its GELU output is as large as its input, and
keeping both for the backward is the largest single item of a block's activation memory. GELU
is one elementwise pass, so recomputing it costs far less than storing it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["gelu_linear"]


class _GeluLinear(torch.autograd.Function):
    """Forward: F.linear(F.gelu(h), weight, bias) (under autocast the linear runs in the autocast
    dtype, as nn.Linear would). Backward: GELU(h) recomputed; the products run in the dtype of
    the incoming gradient, i.e. the forward's compute dtype."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(h, weight, bias)
        return F.linear(F.gelu(h), weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        h, weight, bias = ctx.saved_tensors
        compute = grad_out.dtype
        activation = F.gelu(h).to(compute)
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_activation = grad_out @ weight.to(compute)
        grad_weight = (grad_rows.t() @ activation.reshape(-1, activation.shape[-1])).to(weight.dtype)
        grad_bias = grad_rows.sum(0).to(bias.dtype) if bias is not None else None
        grad_h = torch.ops.aten.gelu_backward(grad_activation.to(h.dtype), h)
        return grad_h, grad_weight, grad_bias


def gelu_linear(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(F.gelu(h), weight, bias); when gradients are needed, GELU(h) is recomputed in the
    backward instead of being kept (the plain ops run otherwise, e.g. for export and FLOP counting)."""
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _GeluLinear.apply(h, weight, bias)
    return F.linear(F.gelu(h), weight, bias)
