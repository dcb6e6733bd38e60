"""Deformable sampling + relative position bias + path ordering: the token sequence of the
deformable scan order, as one op.

For a map x (B, C, h, w), sample points ``grid`` and bias-table points ``disp`` (both (B, h, w, 2),
(x, y) in ``grid_sample`` units with ``align_corners=True``, zeros outside), a bias table
(C, h, w) and predicted path positions (B, L), L = h·w:

    z[b, c, m]   = bilinear(x[b, c], grid[b, m]) + bilinear(table[c], disp[b, m])
    order        = stable argsort of path (token index at each sequence slot)
    seq[b, j, c] = z[b, c, order[b, j]]

The sort has no derivative; the path positions get the original code's surrogate gradient,
the mean over channels of (gradient at sequence slot m − gradient at token m).

Two implementations with the same contract: the PyTorch formulation (two ``grid_sample`` calls,
a gather; any device and dtype, the reference) and, for CUDA tensors, one Triton kernel each way
(``deformable_sampling_triton.py``): the forward writes the sequence in path order directly, the
backward accumulates the gradients of x and of the table with atomics and reduces the gradients
of the sample points over the channels in registers, instead of cuDNN's sampler backwards on a
batch-expanded copy of the table.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

from . import deformable_sampling_triton as _triton
from . import triton_support
from .permute import gather_tokens, invert_permutation

__all__ = ["path_order", "pytorch_formulation", "sample_in_path_order"]

_force_pytorch = False


class _PathOrder(torch.autograd.Function):
    """Gather tokens into path order, with the original surrogate gradient for the path positions.

    Forward: seq[b, j, :] = z[b, :, order[b, j]]. Backward: the exact gradient for z (a gather by
    the inverse order), and for the path positions the mean over channels of (gradient at sequence
    slot m − gradient at token m), which stands in for the zero derivative of a sort.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, path: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.path_dtype = path.dtype
        return gather_tokens(z, order).transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_seq: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        grad_seq_t = grad_seq.transpose(1, 2)  # (B, D, L), slot-major
        grad_z = gather_tokens(grad_seq_t, inverse)
        grad_path = (grad_seq_t - grad_z).mean(dim=1).to(ctx.path_dtype)
        return grad_z, grad_path, None, None


def _sort_path(path: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.argsort(path.detach(), dim=1, stable=True)
    return order, invert_permutation(order)


def path_order(z: torch.Tensor, path: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order the tokens of z (B, D, L) by ascending path position (B, L).

    Returns (seq, order, inverse): seq (B, L, D) with seq[:, j] = token order[:, j], the (B, L)
    order and its inverse permutation (the sequence slot of each token).
    """
    order, inverse = _sort_path(path)
    if torch.is_grad_enabled() and (z.requires_grad or path.requires_grad):
        return _PathOrder.apply(z, path, order, inverse), order, inverse
    # Inference: the same gather without the autograd wrapper (simpler graphs for export).
    return gather_tokens(z, order).transpose(1, 2), order, inverse


def _sample_torch(x: torch.Tensor, grid: torch.Tensor, table: torch.Tensor, disp: torch.Tensor,
                  path: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, channels, h, w = x.shape
    sampled = F.grid_sample(*_common_dtype(x, grid), mode="bilinear", padding_mode="zeros", align_corners=True)
    bias = F.grid_sample(*_common_dtype(table[None].expand(batch, -1, -1, -1), disp), mode="bilinear",
                         padding_mode="zeros", align_corners=True)
    return path_order((sampled + bias).reshape(batch, channels, h * w).to(x.dtype), path)


def _common_dtype(values: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 points of a half-precision map: both in float32, as autocast's grid_sample takes them."""
    if values.dtype == points.dtype:
        return values, points
    dtype = torch.promote_types(values.dtype, points.dtype)
    return values.to(dtype), points.to(dtype)


@contextlib.contextmanager
def pytorch_formulation() -> Iterator[None]:
    """Use the PyTorch formulation even for CUDA tensors inside this block (A/B measurements,
    debugging)."""
    global _force_pytorch
    previous, _force_pytorch = _force_pytorch, True
    try:
        yield
    finally:
        _force_pytorch = previous


def _use_triton(x: torch.Tensor) -> bool:
    # The kernels' atomics sum in no fixed order: under torch.use_deterministic_algorithms(True) the
    # PyTorch formulation runs instead, under PyTorch's own rules for grid_sample.
    return (not _force_pytorch and not torch.are_deterministic_algorithms_enabled() and x.is_cuda
            and x.dtype != torch.float64 and triton_support.ready())


def _check_shapes(x: torch.Tensor, grid: torch.Tensor, table: torch.Tensor, disp: torch.Tensor,
                  path: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, channels, h, w); got {tuple(x.shape)}")
    batch, channels, h, w = x.shape
    for name, t in (("grid", grid), ("disp", disp)):
        if t.shape != (batch, h, w, 2):
            raise ValueError(f"{name} must be (batch={batch}, h={h}, w={w}, 2); got {tuple(t.shape)}")
    if table.shape != (channels, h, w):
        raise ValueError(f"table must be (channels={channels}, h={h}, w={w}); got {tuple(table.shape)}")
    if path.shape != (batch, h * w):
        raise ValueError(f"path must be (batch={batch}, L={h * w}); got {tuple(path.shape)}")


def sample_in_path_order(x: torch.Tensor, grid: torch.Tensor, table: torch.Tensor, disp: torch.Tensor,
                         path: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The deformable sequence (module docstring). Returns (seq (B, L, C), order, inverse).

    ``seq`` has x's dtype (under autocast: the activation dtype the scan reads); the two samples
    are summed in float32 or wider before that rounding. CUDA tensors in float32/float16/bfloat16
    run the Triton kernels (unless deterministic algorithms are on, or inside
    :func:`pytorch_formulation`), everything else the PyTorch formulation; both are differentiable
    in x, grid, table, disp and path.
    """
    _check_shapes(x, grid, table, disp, path)
    if not _use_triton(x):
        return _sample_torch(x, grid, table, disp, path)
    order, inverse = _sort_path(path)
    return _triton.sample_in_path_order_triton(x, grid, table, disp, path, order, inverse), order, inverse
