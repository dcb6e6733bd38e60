"""The three scan orders of a DSSM: stacked into the scan's input, merged back into raster order.

:func:`stack_scan_orders` builds the (B, 3, D, L) scan input from the raster map and the deformable
sequence: raster order, reversed raster order and the deformable order. For CUDA tensors it is one
Triton kernel each way instead of the flip, the transposing copies and the stack (and, backward,
the flip, the add and the transposing copies of the gradients).

The scan runs over (raster, reversed raster, deformable) sequences stacked as (B, 3, D, L). The
merged output is the average of the three, each brought back to raster order: the reversed one
flipped, the deformable one gathered through the inverse of its token order.

:func:`merge_and_gate` also applies the DSSM's gate: the merged map, channels-last and in the
gate's dtype, times the gate. For CUDA tensors it runs as one Triton kernel each way
(``scan_orders_triton.py``) instead of the flip, gather, sums, transpose, cast and product.
"""
from __future__ import annotations

import torch

from . import scan_orders_triton as _triton
from . import triton_support
from .permute import gather_tokens

__all__ = ["merge_and_gate", "merge_scan_orders", "stack_scan_orders"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

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


def stack_scan_orders(x_map: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
    """The scan input (B, 3, D, L) in ``x_map``'s dtype: the map (B, D, h, w) in raster order, in
    reversed raster order, and ``sequence`` (B, L, D), the deformable order, with L = h·w.

    Differentiable in both. A dense channels-last CUDA map and a sequence of a float dtype run the
    Triton kernels (the same values, and gradients exactly as PyTorch's formulation gives them)."""
    if x_map.dim() != 4 or sequence.dim() != 3:
        raise ValueError(f"x_map must be (batch, channels, h, w) and sequence (batch, L, channels); got "
                         f"{tuple(x_map.shape)} and {tuple(sequence.shape)}")
    batch, channels, h, w = x_map.shape
    if sequence.shape != (batch, h * w, channels):
        raise ValueError(f"sequence must be (batch={batch}, L={h * w}, channels={channels}) for a map of shape "
                         f"{tuple(x_map.shape)}; got {tuple(sequence.shape)}")
    if (x_map.is_cuda and x_map.dtype in _FLOATS and sequence.dtype in _FLOATS and x_map.numel() > 0
            and x_map.is_contiguous(memory_format=torch.channels_last) and triton_support.ready()):
        return _triton.stack_scan_orders_triton(x_map.permute(0, 2, 3, 1).reshape(batch, h * w, channels), sequence)
    raster = x_map.flatten(2)
    return torch.stack((raster, raster.flip(-1), sequence.transpose(1, 2).to(raster.dtype)), dim=1)


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


def _use_triton(ys: torch.Tensor, z: torch.Tensor) -> bool:
    return ys.is_cuda and ys.dtype in _FLOATS and z.dtype in _FLOATS and ys.numel() > 0 and triton_support.ready()


def merge_and_gate(ys: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``merge_scan_orders(ys, order, inverse)`` as a channels-last map in z's dtype, times z.

    ys (B, 3, D, L), order/inverse (B, L) as in :func:`merge_scan_orders`, the gate z (B, h, w, D)
    with h·w = L. Returns (B, h, w, D) in z's dtype; differentiable in ys and z.
    """
    if ys.dim() != 4 or ys.shape[1] != NUM_ORDERS:
        raise ValueError(f"ys must be (batch, {NUM_ORDERS}, channels, L); got {tuple(ys.shape)}")
    batch, _, channels, length = ys.shape
    if z.dim() != 4 or z.shape[0] != batch or z.shape[3] != channels or z.shape[1] * z.shape[2] != length:
        raise ValueError(f"z must be (batch={batch}, h, w, channels={channels}) with h·w = L = {length}; "
                         f"got {tuple(z.shape)}")
    for name, t in (("order", order), ("inverse", inverse)):
        if t.shape != (batch, length):
            raise ValueError(f"{name} must be (batch={batch}, L={length}); got {tuple(t.shape)}")
    if _use_triton(ys, z):
        return _triton.merge_and_gate_triton(ys, inverse, z)
    merged = merge_scan_orders(ys, order, inverse)
    return merged.transpose(1, 2).reshape(z.shape).to(z.dtype) * z
