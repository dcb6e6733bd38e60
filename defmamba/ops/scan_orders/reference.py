"""The three scan orders in PyTorch: flip, transposing copies and a stack into the scan input; flip,
gather and mean back out of it, then the SiLU gate. Any device and dtype; the ground truth of the kernels."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..permute import gather_tokens

__all__ = ["NUM_ORDERS", "merge_and_gate_reference", "merge_scan_orders", "stack_scan_orders_reference"]

NUM_ORDERS = 3  # raster, reversed raster, deformable


def stack_scan_orders_reference(x_map: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
    """:func:`defmamba.ops.scan_orders.stack_scan_orders` in PyTorch (shapes checked there)."""
    raster = x_map.flatten(2)
    return torch.stack((raster, raster.flip(-1), sequence.transpose(1, 2).to(raster.dtype)), dim=1)


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


def merge_and_gate_reference(ys: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor,
                             z: torch.Tensor) -> torch.Tensor:
    """:func:`defmamba.ops.scan_orders.merge_and_gate` in PyTorch (shapes checked there)."""
    merged = merge_scan_orders(ys, order, inverse)
    return merged.transpose(1, 2).reshape(z.shape).to(z.dtype) * F.silu(z)
