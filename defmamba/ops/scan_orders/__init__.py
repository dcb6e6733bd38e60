"""The three scan orders of a DSSM: stacked into the scan's input, merged back into raster order.

:func:`stack_scan_orders` builds the (B, 3, D, L) scan input from the raster map and the deformable
sequence: raster order, reversed raster order and the deformable order. :func:`merge_scan_orders`
averages the three scan outputs, each brought back to raster order (the reversed one flipped, the
deformable one gathered through the inverse of its token order); :func:`merge_and_gate` also
applies the DSSM's gate: the merged map, channels-last and in the gate's dtype, times SiLU of the gate.

CUDA tensors of float32/float16/bfloat16 run the Triton kernels (``triton.py``; for the stack, a
dense channels-last map), anything else the PyTorch formulation (``reference.py``): the same
values, and the same gradients.
"""
from __future__ import annotations

import torch

from ..dispatch import use_kernels
from .reference import NUM_ORDERS, merge_and_gate_reference, merge_scan_orders, stack_scan_orders_reference
from .triton import merge_and_gate_triton, stack_scan_orders_triton

__all__ = ["merge_and_gate", "merge_scan_orders", "stack_scan_orders"]


def stack_scan_orders(x_map: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
    """The scan input (B, 3, D, L) in ``x_map``'s dtype: the map (B, D, h, w) in raster order, in
    reversed raster order, and ``sequence`` (B, L, D), the deformable order, with L = h·w.
    Differentiable in both."""
    if x_map.dim() != 4 or sequence.dim() != 3:
        raise ValueError(f"x_map must be (batch, channels, h, w) and sequence (batch, L, channels); got "
                         f"{tuple(x_map.shape)} and {tuple(sequence.shape)}")
    batch, channels, h, w = x_map.shape
    if sequence.shape != (batch, h * w, channels):
        raise ValueError(f"sequence must be (batch={batch}, L={h * w}, channels={channels}) for a map of shape "
                         f"{tuple(x_map.shape)}; got {tuple(sequence.shape)}")
    if use_kernels("scan_orders", x_map, sequence) and x_map.is_contiguous(memory_format=torch.channels_last):
        return stack_scan_orders_triton(x_map.permute(0, 2, 3, 1).reshape(batch, h * w, channels), sequence)
    return stack_scan_orders_reference(x_map, sequence)


def merge_and_gate(ys: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``merge_scan_orders(ys, order, inverse)`` as a channels-last map in z's dtype, times SiLU(z).

    ys (B, 3, D, L), order/inverse (B, L) as in :func:`merge_scan_orders`, the gate's
    pre-activation z (B, h, w, D) with h·w = L (the kernels read it in place when its tokens are
    evenly strided, as in a channel half of the in_proj output). Returns a dense (B, h, w, D) in
    z's dtype; differentiable in ys and z. SiLU is applied here, not before, so that no SiLU(z)
    tensor is written, kept for the backward and read back.
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
    if use_kernels("scan_orders", ys, z):
        return merge_and_gate_triton(ys, inverse, z)
    return merge_and_gate_reference(ys, order, inverse, z)
