"""The deformable sequence in PyTorch: two ``grid_sample`` calls and a gather in path order.

Any device and dtype (the sum has x's dtype); differentiable in x, grid, table, disp and path
(the path through the surrogate gradient of :class:`_PathOrder`). The ground truth of the kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..permute import gather_tokens, invert_permutation

__all__ = ["path_order", "sample_in_path_order_reference", "sample_positions_reference", "sort_path"]


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


def sort_path(path: torch.Tensor) -> torch.Tensor:
    """The order of the path positions (B, L), their stable argsort: the token at each sequence slot.
    Both routes sort with it; the reference inverts it with :func:`invert_permutation`, the Triton
    route's forward kernel writes the inverse as it reads the order."""
    return torch.argsort(path.detach(), dim=1, stable=True)


def path_order(z: torch.Tensor, path: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order the tokens of z (B, D, L) by ascending path position (B, L).

    Returns (seq, order, inverse): seq (B, L, D) with seq[:, j] = token order[:, j], the (B, L)
    order and its inverse permutation (the sequence slot of each token).
    """
    order = sort_path(path)
    inverse = invert_permutation(order)
    if torch.is_grad_enabled() and (z.requires_grad or path.requires_grad):
        return _PathOrder.apply(z, path, order, inverse), order, inverse
    # Inference: the same gather without the autograd wrapper (simpler graphs for export).
    return gather_tokens(z, order).transpose(1, 2), order, inverse


def sample_in_path_order_reference(x: torch.Tensor, grid: torch.Tensor, table: torch.Tensor, disp: torch.Tensor,
                                   path: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`defmamba.ops.deformable_sampling.sample_in_path_order` in PyTorch (shapes checked there)."""
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


def sample_positions_reference(offsets: torch.Tensor, offset_scale_xy: torch.Tensor, reference_xy: torch.Tensor,
                               half_key_xy: torch.Tensor, reference_path: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`defmamba.ops.deformable_sampling.sample_positions` in PyTorch (shapes checked there)."""
    batch, _, h, w = offsets.shape
    bounded = torch.tanh(offsets.to(reference_xy.dtype)).permute(0, 2, 3, 1)  # (B, h, w, 3): dy, dx, path
    # The channel pair flipped to (dx, dy) once and scaled in place (in the position dtype, as a
    # Python scalar factor would be).
    grid = bounded[..., :2].flip(-1).mul_(offset_scale_xy) + reference_xy
    # Bias-table points (key − sample point) / 2, exactly as rounded as the two-step form.
    disp = torch.add(half_key_xy, grid, alpha=-0.5)
    path = bounded[..., 2].reshape(batch, h * w) + reference_path
    return grid, disp, path
