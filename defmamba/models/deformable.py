"""The deformable token order of DefMamba: offset network, deformable sampling with a relative
position bias, and ordering of the tokens by a predicted path position.

Shapes: x is the (B, D, h, w) output of the DSSM's depthwise conv + SiLU; L = h·w. A 1-pixel
high (or wide) map has no room to move along that axis; there the offset, reference point and key
grid along the axis are defined as 0 (the only point of a size-1 axis under
``align_corners=True``), where the original formulas divide by zero.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.permute import gather_tokens, invert_permutation

__all__ = ["ConvOffset", "DeformableLayer", "DeformableOutput", "path_order"]

RPE_TABLE_SIZE = 7


class ConvOffset(nn.Module):
    """Offset network: depthwise conv gated by channel attention → LN → GELU → 1×1 conv to 3 maps.

    Output channels: 0 = row (y) offset, 1 = column (x) offset, 2 = path position; all pre-tanh.
    """

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        hidden = channels // 16
        self.conv1 = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.ca = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels), nn.Sigmoid())
        self.ln = nn.LayerNorm(channels)
        self.conv2 = nn.Conv2d(channels, 3, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attention = self.ca(x.mean(dim=(2, 3)))  # from the input, not from conv1's output
        t = self.conv1(x) * attention[:, :, None, None]
        t = F.gelu(self.ln(t.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return self.conv2(t)


def _inverse_extent(size: int) -> float:
    """1/(size−1), the grid step scale of the original code; 0 on a 1-pixel axis (no movement)."""
    return 1.0 / (size - 1) if size > 1 else 0.0


def _offset_scale(size: int) -> float:
    """Offset scale 1/(size−1), rounded to float32 as the original code's float32 factor tensor is."""
    return torch.tensor(_inverse_extent(size), dtype=torch.float32).item()


def _reference_coords(size: int, like: torch.Tensor) -> torch.Tensor:
    """Cell-centre reference points (i + 0.5)/(size − 1)·2 − 1 of the original code (0 if size == 1)."""
    coords = torch.linspace(0.5, size - 0.5, size, dtype=like.dtype, device=like.device)
    return coords * (2 * _inverse_extent(size)) - 1 if size > 1 else torch.zeros_like(coords)


def _key_coords(size: int, like: torch.Tensor) -> torch.Tensor:
    """Key grid linspace(0, size, size)/(size − 1)·2 − 1 of the original code (0 if size == 1)."""
    coords = torch.linspace(0, size, size, dtype=like.dtype, device=like.device)
    return coords * (2 * _inverse_extent(size)) - 1 if size > 1 else torch.zeros_like(coords)


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


def path_order(z: torch.Tensor, path: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order the tokens of z (B, D, L) by ascending path position (B, L).

    Returns (seq, order, inverse): seq (B, L, D) with seq[:, j] = token order[:, j], the (B, L)
    order and its inverse permutation (the sequence slot of each token).
    """
    order = torch.argsort(path.detach(), dim=1, stable=True)
    inverse = invert_permutation(order)
    if torch.is_grad_enabled() and (z.requires_grad or path.requires_grad):
        return _PathOrder.apply(z, path, order, inverse), order, inverse
    # Inference: the same gather without the autograd wrapper (simpler graphs for export).
    return gather_tokens(z, order).transpose(1, 2), order, inverse


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
        batch, _, h, w = x.shape
        offsets = self.conv_offset(x)
        offset_y = torch.tanh(offsets[:, 0]) * _offset_scale(h)
        offset_x = torch.tanh(offsets[:, 1]) * _offset_scale(w)
        pos_y = _reference_coords(h, x)[None, :, None] + offset_y  # (B, h, w)
        pos_x = _reference_coords(w, x)[None, None, :] + offset_x
        grid = torch.stack((pos_x, pos_y), dim=-1)
        sampled = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)

        # The resized bias table is the same for every image: resize once, broadcast over the batch.
        rpe = F.interpolate(self.rpe_table[None], size=(h, w), mode="bilinear", align_corners=False)
        disp_y = (_key_coords(h, x)[None, :, None] - pos_y) * 0.5
        disp_x = (_key_coords(w, x)[None, None, :] - pos_x) * 0.5
        pos_bias = F.grid_sample(rpe.expand(batch, -1, -1, -1), torch.stack((disp_x, disp_y), dim=-1),
                                 mode="bilinear", padding_mode="zeros", align_corners=True)

        length = h * w
        path_ref = _reference_coords(length, x)
        path = torch.tanh(offsets[:, 2].reshape(batch, length)) + path_ref
        sequence, order, inverse = path_order((sampled + pos_bias).reshape(batch, -1, length), path)
        return DeformableOutput(sequence, order, inverse, grid, path)
