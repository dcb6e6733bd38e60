"""LayerNorm (optionally followed by the exact GELU, optionally of a channel-scaled input) in
PyTorch: ``F.layer_norm`` and ``F.gelu``, any device and dtype. The ground truth of the kernels."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["layer_norm_reference"]


def layer_norm_reference(x: torch.Tensor, normalized_shape: tuple[int, ...], weight: Optional[torch.Tensor],
                         bias: Optional[torch.Tensor], eps: float, gelu: bool = False,
                         channel_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.layer_norm(x · s, ...)``, then ``F.gelu`` with ``gelu``; ``channel_scale`` s (B, C) scales
    the channels of image b (x's first dim) by s[b]."""
    if channel_scale is not None:
        x = x * channel_scale.view(x.shape[:1] + (1,) * (x.dim() - 2) + x.shape[-1:])
    y = F.layer_norm(x, normalized_shape, weight, bias, eps)
    return F.gelu(y) if gelu else y
