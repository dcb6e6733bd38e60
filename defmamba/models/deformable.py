"""The deformable token order of DefMamba: offset network, deformable sampling with a relative
position bias, and ordering of the tokens by a predicted path position.

Shapes: x is the (B, D, h, w) output of the DSSM's depthwise conv + SiLU; L = h·w. A 1-pixel
high (or wide) map has no room to move along that axis; there the offset, reference point and key
grid along the axis are defined as 0 (the only point of a size-1 axis under
``align_corners=True``), where the original formulas divide by zero.

Positions (reference points, key grid, offset scaling, sample points, path positions) are float32
whatever the activation dtype (float64 for float64 activations): under float16/bfloat16 autocast
the offsets come out of the offset network in half precision, but positions built in it would
overflow float16 beyond 65,504 tokens and tie neighbouring path positions beyond 2,048 (bfloat16:
256). For float32 and float64 activations this is the original computation unchanged.
"""
from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.channel_attention import channel_attention
from ..ops.deformable_sampling import sample_in_path_order, sample_positions, sample_positions_and_table
from ..ops.depthwise_conv import DepthwiseConv2d
from ..ops.dispatch import runs_as_called
from ..ops.layer_norm import LayerNorm, layer_norm_gelu
from ..ops.table_resize import TableResize, table_resize

__all__ = ["ConvOffset", "DeformableLayer", "DeformableOutput", "reference_points"]

RPE_TABLE_SIZE = 7


class ConvOffset(nn.Module):
    """Offset network: depthwise conv gated by channel attention → LN → GELU → 1×1 conv to 3 maps.

    Output channels: 0 = row (y) offset, 1 = column (x) offset, 2 = path position; all pre-tanh.
    ``ca`` (Linear, GELU, Linear, Sigmoid) holds the channel attention's layers under the official
    keys; they run as :func:`~defmamba.ops.channel_attention.channel_attention`.
    """

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        hidden = channels // 16
        self.conv1 = DepthwiseConv2d(channels, kernel_size)
        self.ca = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels), nn.Sigmoid())
        self.ln = LayerNorm(channels)
        self.conv2 = nn.Conv2d(channels, 3, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # From the input, not from conv1's output; the layers of ``ca`` as one op (ops/channel_attention/).
        fc1, fc2 = self.ca[0], self.ca[2]
        attention = channel_attention(x.mean(dim=(2, 3)), fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        # GELU(LN(conv1(x) · attention)) in one pass, the attention applied as the norm reads its
        # input; it feeds only the 1×1 conv2, so under autocast it comes out in the autocast dtype
        # that conv2 would round it to.
        t = layer_norm_gelu(self.conv1(x).permute(0, 2, 3, 1), self.ln, autocast_dtype_output=True,
                            channel_scale=attention)
        if runs_as_called(self.conv2):
            return self.conv2(t.permute(0, 3, 1, 2))
        # The 1×1 conv2 as the matmul over channels it is, on the channels-last t: the same maps (in
        # the same channels-last layout), but its weight gradient comes back in the weight's own
        # layout. A 1×1 conv of a channels-last input returns a channels-last weight gradient, whose
        # strides differ from the weight's in the size-1 dims: DistributedDataParallel then warns
        # ("Grad strides do not match bucket view strides") and copies it at every step.
        return F.linear(t, self.conv2.weight.flatten(1)).permute(0, 3, 1, 2)


def _inverse_extent(size: int) -> float:
    """1/(size−1), the grid step scale of the original code; 0 on a 1-pixel axis (no movement)."""
    return 1.0 / (size - 1) if size > 1 else 0.0


def _offset_scale(size: int) -> float:
    """Offset scale 1/(size−1), rounded to float32 as the original code's float32 factor tensor is.

    Rounded in Python arithmetic (24-bit mantissa, ties to even like IEEE), not through a tensor's
    ``.item()``, which would split a torch.compile graph."""
    mantissa, exponent = math.frexp(_inverse_extent(size))
    return math.ldexp(round(mantissa * 2 ** 24) / 2 ** 24, exponent)


def _position_dtype(like: torch.Tensor) -> torch.dtype:
    """The dtype positions are computed in for activations like ``like``: float64 for float64,
    float32 otherwise (float16 and bfloat16 included)."""
    return torch.float64 if like.dtype == torch.float64 else torch.float32


def _reference_coords(size: int, like: torch.Tensor) -> torch.Tensor:
    """Cell-centre reference points (i + 0.5)/(size − 1)·2 − 1 of the original code (0 if size == 1),
    in :func:`_position_dtype`."""
    coords = torch.linspace(0.5, size - 0.5, size, dtype=_position_dtype(like), device=like.device)
    return coords * (2 * _inverse_extent(size)) - 1 if size > 1 else torch.zeros_like(coords)


def _key_coords(size: int, like: torch.Tensor) -> torch.Tensor:
    """Key grid linspace(0, size, size)/(size − 1)·2 − 1 of the original code (0 if size == 1), in
    :func:`_position_dtype`."""
    coords = torch.linspace(0, size, size, dtype=_position_dtype(like), device=like.device)
    return coords * (2 * _inverse_extent(size)) - 1 if size > 1 else torch.zeros_like(coords)


def reference_points(h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """(h, w, 2) reference points (x, y) of an h × w map on ``like``'s device, in float32 (float64 for
    a float64 ``like``)."""
    return torch.stack(torch.meshgrid(_reference_coords(w, like), _reference_coords(h, like), indexing="xy"), dim=-1)


class _GridConstants(NamedTuple):
    """The input-independent tensors of the position computation for one map size, all in the
    position dtype (float32, or float64 for float64 activations) but the offset scales."""

    offset_scale_xy: torch.Tensor  # (2,) float32: offset scales along x and y (_offset_scale)
    reference_xy: torch.Tensor  # (h, w, 2) reference points (x, y)
    half_key_xy: torch.Tensor  # (h, w, 2) key grid (x, y) times 0.5
    reference_path: torch.Tensor  # (h·w,) reference path positions
    table_resize: Optional[TableResize]  # the bilinear resize of the bias table to (h, w)


_GRID_CONSTANTS: "OrderedDict[tuple, _GridConstants]" = OrderedDict()
# map sizes × position dtypes × devices; an entry holds 20 bytes per pixel in float32 (1.3 MB for the
# 200 × 334 first stage of an 800 × 1333 detection input) and 28 bytes per row and column
_GRID_CONSTANTS_KEPT = 32


def _eager(like: torch.Tensor) -> bool:
    """A plain tensor outside tracing and torch.compile, which build their own constants."""
    return type(like) is torch.Tensor and not torch.compiler.is_compiling() and not torch.jit.is_tracing()


def _capturing(like: torch.Tensor) -> bool:
    """Inside a CUDA graph recording: a tensor made now holds its values only after a replay."""
    return like.is_cuda and torch.cuda.is_current_stream_capturing()


def _grid_constants(h: int, w: int, like: torch.Tensor, table_size: tuple[int, int]) -> _GridConstants:
    """Reference points, key grid, offset scales and the bias-table resize weights for an h × w map
    in the position dtype of ``like`` and on its device, computed once per size (the formulas of _reference_coords,
    _key_coords, _offset_scale and ops/table_resize.py) and kept: in eager mode each forward would
    otherwise launch a dozen tiny kernels per block for them. A CUDA graph recording reuses kept
    constants but keeps none of its own."""
    dtype = _position_dtype(like)
    key = (h, w, table_size, dtype, like.device)
    eager = _eager(like)
    kept = _GRID_CONSTANTS.get(key) if eager else None
    if kept is not None:
        with contextlib.suppress(KeyError):  # another thread (nn.DataParallel) may have evicted it
            _GRID_CONSTANTS.move_to_end(key)
        return kept
    keep = eager and not _capturing(like)
    # Kept tensors must be ordinary tensors even when first made under inference_mode.
    with torch.inference_mode(False) if keep else contextlib.nullcontext(), torch.no_grad():
        key_x, key_y = _key_coords(w, like), _key_coords(h, like)
        scale = [torch.full((), _offset_scale(size), dtype=torch.float32, device=like.device) for size in (w, h)]
        tracing = torch.jit.is_tracing()
        constants = _GridConstants(
            offset_scale_xy=torch.stack(scale),
            reference_xy=reference_points(h, w, like),
            half_key_xy=torch.stack(torch.meshgrid(key_x, key_y, indexing="xy"), dim=-1) * 0.5,
            reference_path=_reference_coords(h * w, like),
            # a traced model resizes with F.interpolate (DeformableLayer.forward) and needs none
            table_resize=None if tracing else table_resize(table_size, h, w, like.device, dtype),
        )
    if keep:
        _GRID_CONSTANTS[key] = constants
        while len(_GRID_CONSTANTS) > _GRID_CONSTANTS_KEPT:
            with contextlib.suppress(KeyError):
                _GRID_CONSTANTS.popitem(last=False)
    return constants


class DeformableOutput(NamedTuple):
    """What the deformable layer produces (sample_points and path for inspection and visualisation)."""

    sequence: torch.Tensor  # (B, L, D) tokens in path order
    order: torch.Tensor  # (B, L) token index at each sequence position
    inverse: torch.Tensor  # (B, L) sequence position of each token (the inverse of order)
    sample_points: torch.Tensor  # (B, h, w, 2) sampling positions (x, y) in [-1, 1] grid units
    path: torch.Tensor  # (B, L) predicted path position of each token


class DeformableLayer(nn.Module):
    """Deformable sampling + relative position bias + path ordering (the ``DS`` module)."""

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        self.rpe_table = nn.Parameter(torch.empty(channels, RPE_TABLE_SIZE, RPE_TABLE_SIZE))
        self.conv_offset = ConvOffset(channels, kernel_size)
        nn.init.trunc_normal_(self.rpe_table, std=0.01)

    def forward(self, x: torch.Tensor) -> DeformableOutput:
        _, _, h, w = x.shape
        constants = _grid_constants(h, w, x, tuple(self.rpe_table.shape[1:]))
        offsets = self.conv_offset(x)  # under autocast in its dtype; positions are built in float32
        # Sample points (x, y) = reference point + tanh(offset) · grid step, the bias-table points
        # (key − sample point) / 2 and the path positions, in the position dtype; and the bias table
        # resized to (h, w), the same for every image, in the (h, w, C) layout the sampling kernel
        # reads: one launch on the GPU (ops/deformable_sampling/, ops/table_resize.py). A traced
        # model (FLOP counting) records the interpolation the paper's model counted.
        positions = (offsets, constants.offset_scale_xy, constants.reference_xy, constants.half_key_xy,
                     constants.reference_path)
        if constants.table_resize is None:
            grid, disp, path = sample_positions(*positions)
            rpe = F.interpolate(self.rpe_table[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        else:
            grid, disp, path, rpe = sample_positions_and_table(*positions, self.rpe_table, constants.table_resize)
            rpe = rpe.permute(2, 0, 1)
        # x sampled at grid plus the table sampled at disp, in path order (ops/deformable_sampling.py).
        sequence, order, inverse = sample_in_path_order(x, grid, rpe, disp, path)
        return DeformableOutput(sequence, order, inverse, grid, path)
