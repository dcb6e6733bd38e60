"""PyTorch formulation of :func:`defmamba.ops.drop_path.add_dropped_path` (any device and dtype)."""
from __future__ import annotations

import torch

__all__ = ["add_dropped_path_reference"]


def add_dropped_path_reference(x: torch.Tensor, branch: torch.Tensor, kept: torch.Tensor, keep_prob: float) -> torch.Tensor:
    """x + branch · kept[b] / keep_prob, in the wider dtype of x and branch; ``kept`` (B,) holds 0 or 1
    per sample in branch's dtype (timm's DropPath: the scale is divided and rounded in that dtype)."""
    scale = kept.div(keep_prob).view((-1,) + (1,) * (branch.dim() - 1))
    return torch.addcmul(x, branch, scale)
