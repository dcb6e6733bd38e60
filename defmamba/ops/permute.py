"""Token permutations along the sequence axis: a gather by a token index, and the inverse of a
permutation (whose gather is the exact, atomic-free adjoint of the first: docs/ops.md).
"""
from __future__ import annotations

import torch

__all__ = ["gather_tokens", "invert_permutation"]


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """out[b, :, j] = x[b, :, index[b, j]] for x (B, D, L) and index (B, L)."""
    return torch.gather(x, 2, index[:, None, :].expand(-1, x.shape[1], -1))


def invert_permutation(order: torch.Tensor) -> torch.Tensor:
    """Inverse of each row permutation of ``order`` (B, L): inverse[b, order[b, j]] = j."""
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)
