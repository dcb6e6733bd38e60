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

CUDA tensors run the Triton kernels (``triton.py``), anything else the PyTorch formulation
(``reference.py``), which also runs under ``torch.use_deterministic_algorithms(True)`` (the
kernels' backward sums with atomics, in no fixed order).
"""
from __future__ import annotations

import torch

from ..dispatch import use_kernels
from .reference import sample_in_path_order_reference, sort_path
from .triton import sample_in_path_order_triton

__all__ = ["sample_in_path_order"]


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
    are summed in float32 or wider before that rounding. Differentiable in x, grid, table, disp
    and path on both routes.
    """
    _check_shapes(x, grid, table, disp, path)
    if not use_kernels("deformable_sampling", x) or torch.are_deterministic_algorithms_enabled():
        return sample_in_path_order_reference(x, grid, table, disp, path)
    order, inverse = sort_path(path)
    return sample_in_path_order_triton(x, grid, table, disp, path, order, inverse), order, inverse
