"""Deformable sampling + relative position bias + path ordering: the token sequence of the
deformable scan order, as one op; and the positions it samples at, from the offset network's maps.

For a map x (B, C, h, w), sample points ``grid`` and bias-table points ``disp`` (both (B, h, w, 2),
(x, y) in ``grid_sample`` units with ``align_corners=True``, zeros outside), a bias table
(C, h, w) and predicted path positions (B, L), L = h·w:

    z[b, c, m]   = bilinear(x[b, c], grid[b, m]) + bilinear(table[c], disp[b, m])
    order        = stable argsort of path (token index at each sequence slot)
    seq[b, j, c] = z[b, c, order[b, j]]

The sort has no derivative; the path positions get the original code's surrogate gradient,
the mean over channels of (gradient at sequence slot m − gradient at token m). The op also returns
``inverse`` (inverse[b, order[b, j]] = j, the sequence slot of each token), which the Triton
forward kernel writes as it reads the order.

CUDA tensors run the Triton kernels (``triton.py``), anything else the PyTorch formulation
(``reference.py``), which also runs under ``torch.use_deterministic_algorithms(True)`` (the
kernels' backward sums with atomics, in no fixed order).
"""
from __future__ import annotations

import torch

from ..dispatch import use_kernels
from ..table_resize import TableResize, resize_channels_last
from .positions_triton import sample_positions_and_table_triton, sample_positions_triton
from .reference import sample_in_path_order_reference, sample_positions_reference
from .triton import sample_in_path_order_triton

__all__ = ["sample_in_path_order", "sample_positions", "sample_positions_and_table"]


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


def _check_position_shapes(offsets: torch.Tensor, offset_scale_xy: torch.Tensor, reference_xy: torch.Tensor,
                           half_key_xy: torch.Tensor, reference_path: torch.Tensor) -> None:
    if offsets.dim() != 4 or offsets.shape[1] != 3:
        raise ValueError(f"offsets must be (batch, 3, h, w); got {tuple(offsets.shape)}")
    _, _, h, w = offsets.shape
    for name, t, shape in (("offset_scale_xy", offset_scale_xy, (2,)), ("reference_xy", reference_xy, (h, w, 2)),
                           ("half_key_xy", half_key_xy, (h, w, 2)), ("reference_path", reference_path, (h * w,))):
        if t.shape != shape:
            raise ValueError(f"{name} must be {shape} for offsets of shape {tuple(offsets.shape)}; got {tuple(t.shape)}")


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
    return sample_in_path_order_triton(x, grid, table, disp, path)


def sample_positions(offsets: torch.Tensor, offset_scale_xy: torch.Tensor, reference_xy: torch.Tensor,
                     half_key_xy: torch.Tensor, reference_path: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample points, bias-table points and path positions from the offset maps (B, 3, h, w)
    (channels: row offset, column offset, path position, all before tanh), with t = tanh(offsets):

        grid[b, i, j] = (t_col · scale_x, t_row · scale_y) + reference_xy[i, j]
        disp[b, i, j] = half_key_xy[i, j] − grid[b, i, j] / 2
        path[b, i·w + j] = t_path + reference_path[i·w + j]

    ``offset_scale_xy`` (2,) float32, ``reference_xy`` and ``half_key_xy`` (h, w, 2) and
    ``reference_path`` (h·w,) in the position dtype (float32, or float64), which is that of the
    outputs; offsets in any floating dtype. Differentiable in the offsets. Float32 positions of
    CUDA offsets run the Triton kernels (``positions_triton.py``), anything else the PyTorch
    formulation (``reference.py``)."""
    _check_position_shapes(offsets, offset_scale_xy, reference_xy, half_key_xy, reference_path)
    if use_kernels("deformable_sampling", offsets) and reference_xy.dtype == torch.float32:
        return sample_positions_triton(offsets, offset_scale_xy, reference_xy, half_key_xy, reference_path)
    return sample_positions_reference(offsets, offset_scale_xy, reference_xy, half_key_xy, reference_path)


def sample_positions_and_table(offsets: torch.Tensor, offset_scale_xy: torch.Tensor, reference_xy: torch.Tensor,
                               half_key_xy: torch.Tensor, reference_path: torch.Tensor, table: torch.Tensor,
                               resize: TableResize) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`sample_positions` and the bias table (C, a, b) resized to the offsets' (h, w) by
    :func:`~defmamba.ops.table_resize.resize_channels_last` (``resize`` from
    :func:`~defmamba.ops.table_resize.table_resize`): (grid, disp, path, table (h, w, C)).
    Differentiable in the offsets and the table. Where :func:`sample_positions` runs its Triton
    kernel (and the resize weights are float32), the resize runs in the same launch
    (``positions_triton.py``); elsewhere these are the two functions."""
    _check_position_shapes(offsets, offset_scale_xy, reference_xy, half_key_xy, reference_path)
    _, _, h, w = offsets.shape
    if table.dim() != 3 or resize.weight_y.shape != (h, table.shape[1]) or resize.weight_x.shape != (w, table.shape[2]):
        raise ValueError(f"sample_positions_and_table: a (channels, rows, columns) table and resize weights "
                         f"(h={h}, rows) and (w={w}, columns); got table {tuple(table.shape)}, weights "
                         f"{tuple(resize.weight_y.shape)} and {tuple(resize.weight_x.shape)}")
    if (use_kernels("deformable_sampling", offsets, table) and reference_xy.dtype == torch.float32
            and resize.weight_y.dtype == resize.weight_x.dtype == torch.float32):
        return sample_positions_and_table_triton(offsets, offset_scale_xy, reference_xy, half_key_xy, reference_path,
                                                 table, resize)
    return (*sample_positions(offsets, offset_scale_xy, reference_xy, half_key_xy, reference_path),
            resize_channels_last(table, resize.weight_y, resize.weight_x))
