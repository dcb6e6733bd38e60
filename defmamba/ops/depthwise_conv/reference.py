"""The depthwise convolution in PyTorch: ``F.conv2d`` with one group per channel (any device,
dtype and layout; cuDNN on CUDA). The ground truth of the kernels."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["depthwise_conv2d_reference"]


def depthwise_conv2d_reference(x: torch.Tensor, weight: torch.Tensor,
                               bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=K // 2, groups=C)`` for a (C, 1, K, K) weight."""
    return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=weight.shape[0])
