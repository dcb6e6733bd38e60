"""Bilinear resize of a small (C, a, b) table to (h, w, C) as two small matrix products.

``F.interpolate(table[None], size=(h, w), mode="bilinear", align_corners=False)`` is separable:
W_y · T · W_xᵀ per channel, with W_y (h, a) and W_x (w, b) depending only on the sizes. The result
is the contiguous channels-last (h, w, C) layout the sampling kernel reads; its backward is two
more matmuls (docs/ops.md).

The products run in float32 (float64 for a float64 table) with autocast off, and the result has
the table's dtype, as the interpolation's has. They follow PyTorch's float32 matmul precision
setting (``torch.backends.cuda.matmul.allow_tf32``): with TF32 allowed they round the table to
TF32 first, as every other float32 matmul of the model then does.

:class:`TableResize` holds what a resize to one (h, w) needs, made once per size by
:func:`table_resize`: the two matrices and, for the Triton route that resizes inside the sample
positions' kernel (``ops/deformable_sampling/``), the first nonzero column of each of their rows
(a row of a bilinear resize has at most two nonzero weights, in neighbouring columns), and the
range of rows that can weigh each column, for the gradient's programs there.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["TableResize", "bilinear_weights", "column_spans", "first_nonzero_columns", "resize_channels_last",
           "table_resize"]


class TableResize(NamedTuple):
    """The resize of an (a, b) table to (h, w) (:func:`table_resize`)."""

    weight_y: torch.Tensor  # (h, a) bilinear_weights(a, h)
    weight_x: torch.Tensor  # (w, b) bilinear_weights(b, w)
    first_y: torch.Tensor  # (h,) int32: the first column of each row of weight_y holding a nonzero weight
    first_x: torch.Tensor  # (w,) int32: and of weight_x
    span_y: torch.Tensor  # (a, 2) int32: for each column of weight_y, [begin, end) of the rows that may weigh it
    span_x: torch.Tensor  # (b, 2) int32: and of weight_x


def bilinear_weights(in_size: int, out_size: int, device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(out_size, in_size) matrix of the 1-D bilinear resize with ``align_corners=False``.

    Row o holds the weights of output o: source position s = (o + 0.5)·in/out − 0.5 clamped at 0,
    weight 1 − (s − ⌊s⌋) at ⌊s⌋ and s − ⌊s⌋ at ⌊s⌋ + 1 (both at the last entry past the end), the
    convention of ``F.interpolate``. Computed in float64 (float32 on devices without it), returned
    in ``dtype``. Built from device tensors (no host-to-device copy, so it can be made inside a
    CUDA graph recording)."""
    in_size, out_size = int(in_size), int(out_size)  # also where a tracer hands sizes over as tensors
    if in_size < 1 or out_size < 1:
        raise ValueError(f"bilinear_weights: sizes must be positive, got in_size={in_size}, out_size={out_size}")
    work = torch.float32 if torch.device(device or "cpu").type == "mps" else torch.float64
    dst = torch.arange(out_size, dtype=work, device=device)
    src = ((dst + 0.5) * (in_size / out_size) - 0.5).clamp(min=0)
    first = src.floor().clamp(max=in_size - 1)
    second = (first + 1).clamp(max=in_size - 1)
    frac = src - first
    columns = torch.arange(in_size, dtype=work, device=device)
    weights = (1 - frac)[:, None] * (columns == first[:, None]) + frac[:, None] * (columns == second[:, None])
    return weights.to(dtype)


def resize_channels_last(table: torch.Tensor, weight_y: torch.Tensor, weight_x: torch.Tensor) -> torch.Tensor:
    """Resize ``table`` (C, a, b) with the matrices weight_y (h, a) and weight_x (w, b) of
    :func:`bilinear_weights`; returns the contiguous (h, w, C) result in the table's dtype
    (computed in float32 or wider, whatever autocast says), differentiable in the table.
    ``out.permute(2, 0, 1)`` equals ``F.interpolate(table[None], (h, w), mode="bilinear",
    align_corners=False)[0]`` up to float32 rounding."""
    channels, a, b = table.shape
    h, w = weight_y.shape[0], weight_x.shape[0]
    if weight_y.shape != (h, a) or weight_x.shape != (w, b):
        raise ValueError(f"resize_channels_last: weights {tuple(weight_y.shape)} and {tuple(weight_x.shape)} do not "
                         f"match a ({channels}, {a}, {b}) table; expected (h, {a}) and (w, {b})")
    out_dtype = table.dtype
    with torch.autocast(table.device.type, enabled=False):
        dtype = torch.promote_types(table.dtype, torch.float32)
        table, weight_y, weight_x = table.to(dtype), weight_y.to(dtype), weight_x.to(dtype)
        # columns: by_column[j, c·a + r] = Σ_s weight_x[j, s] · table[c, r, s]
        by_column = torch.matmul(weight_x, table.reshape(channels * a, b).t())  # (w, C·a)
        # rows: out[i, j·C + c] = Σ_r weight_y[i, r] · by_column[j, c·a + r]
        out = torch.matmul(weight_y, by_column.view(w * channels, a).t())  # (h, w·C)
    return out.view(h, w, channels).to(out_dtype)


def first_nonzero_columns(weights: torch.Tensor) -> torch.Tensor:
    """(rows,) int32: the first column of each row of a :func:`bilinear_weights` matrix with a
    nonzero weight; the row's other nonzero weight, if any, is in the next column."""
    return (weights != 0).to(torch.int32).argmax(dim=1).to(torch.int32)


def column_spans(first: torch.Tensor, columns: int) -> torch.Tensor:
    """(columns, 2) int32: for each column c of a bilinear weight matrix whose rows' first nonzero
    columns are ``first`` (nondecreasing), the range [begin, end) of the rows with c as their first
    nonzero column or the next one, the only rows that can weigh c."""
    column = torch.arange(columns, dtype=torch.int32, device=first.device)
    begin = torch.searchsorted(first, column - 1, out_int32=True)
    end = torch.searchsorted(first, column, right=True, out_int32=True)
    return torch.stack([begin, end], dim=1)


def table_resize(table_size: tuple[int, int], h: int, w: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> TableResize:
    """The matrices (in ``dtype``), first nonzero columns and column spans that resize an
    ``table_size`` = (a, b) table to (h, w) (module docstring)."""
    weight_y = bilinear_weights(table_size[0], h, device, dtype)
    weight_x = bilinear_weights(table_size[1], w, device, dtype)
    first_y, first_x = first_nonzero_columns(weight_y), first_nonzero_columns(weight_x)
    return TableResize(weight_y, weight_x, first_y, first_x, column_spans(first_y, table_size[0]),
                       column_spans(first_x, table_size[1]))

