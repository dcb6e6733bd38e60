"""Merging the three scan orders of a DSSM back into raster order.

The scan runs over (raster, reversed raster, deformable) sequences stacked as (B, 3, D, L). The
merged output is the average of the three, each brought back to raster order: the reversed one
flipped, the deformable one gathered through the inverse of its token order.
"""
from __future__ import annotations

import torch

from .permute import gather_tokens

__all__ = ["merge_scan_orders"]

NUM_ORDERS = 3


def _merge(ys: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    return (ys[:, 0] + ys[:, 1].flip(-1) + gather_tokens(ys[:, 2], inverse)) / NUM_ORDERS


class _MergeScanOrders(torch.autograd.Function):
    """Backward as one stack of (g, flipped g, g gathered through the order): a permutation's
    adjoint is its inverse, so no scatter, no zero-filled slices and no atomics are needed."""

    @staticmethod
    def forward(ctx, ys: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(order)
        return _merge(ys, inverse)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (order,) = ctx.saved_tensors
        g = grad / NUM_ORDERS
        return torch.stack((g, g.flip(-1), gather_tokens(g, order)), dim=1), None, None


def merge_scan_orders(ys: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Average of the three scan outputs ys (B, 3, D, L) in raster order → (B, D, L).

    ``order`` (B, L) is the deformable token order (token index at each sequence slot) and
    ``inverse`` its inverse permutation; they must be exact inverses (not checked).
    """
    if ys.dim() != 4 or ys.shape[1] != NUM_ORDERS:
        raise ValueError(f"ys must be (batch, {NUM_ORDERS}, channels, L); got {tuple(ys.shape)}")
    if torch.is_grad_enabled() and ys.requires_grad:
        return _MergeScanOrders.apply(ys, order, inverse)
    return _merge(ys, inverse)
