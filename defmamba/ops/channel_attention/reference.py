"""PyTorch formulation of :func:`defmamba.ops.channel_attention.channel_attention` (any device and
dtype; the ground truth of the Triton kernels, and what tracing, export and FLOP counting record)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["channel_attention_reference"]


def channel_attention_reference(pooled: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor,
                                fc2_weight: torch.Tensor, fc2_bias: torch.Tensor) -> torch.Tensor:
    """sigmoid(fc2(GELU(fc1(pooled)))), the exact (erf) GELU, as ``nn.Sequential(Linear, GELU,
    Linear, Sigmoid)`` computes it (autocast's rules included)."""
    return torch.sigmoid(F.linear(F.gelu(F.linear(pooled, fc1_weight, fc1_bias)), fc2_weight, fc2_bias))
