"""The hidden-layer gradient of the MLP in PyTorch: ``F.gelu``, ``gelu_backward`` and a column sum.
Any device and dtype; the ground truth of the kernel."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gelu_grad_and_column_sums_reference"]


def gelu_grad_and_column_sums_reference(h: torch.Tensor,
                                        grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`defmamba.ops.gelu_mlp.gelu_grad_and_column_sums` in PyTorch; the sums in h's dtype."""
    grad_h = torch.ops.aten.gelu_backward(grad, h)
    return F.gelu(h), grad_h, grad_h.reshape(-1, h.shape[-1]).sum(0)
