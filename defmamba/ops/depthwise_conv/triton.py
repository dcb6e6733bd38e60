"""Triton kernels of :func:`defmamba.ops.depthwise_conv.depthwise_conv2d` (channels-last CUDA maps).

Depthwise K×K convolution, stride 1, padding K//2, odd K, float32 accumulation; the input gradient
is the same kernel with the taps flipped, the weight and bias gradients sum partial rows per
program (no atomics: deterministic). x may be the channel slice of a wider channels-last tensor
(:func:`pixel_stride`). Design: docs/ops.md.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..kernel_op import kernel_op
from ..triton_math import silu as silu_f32
from ..triton_launch import fast_launch
from ..triton_support import cdiv, check_launch, interpreting, next_power_of_2, tl, triton

__all__ = ["depthwise_conv2d_triton", "pixel_stride"]

_BAND_ROWS = 32  # image rows (of all images, in order) per weight-gradient program
_WGRAD_TILE = 64  # taps of a kernel row's power-of-two block (see _wgrad_taps) × pixels per weight-gradient tile
_WGRAD_BLOCK_C = 32  # channels per weight-gradient tile


if triton is not None:

    @fast_launch
    @triton.jit
    def _dwconv_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, pre_ptr, height, width, channels, x_pixel_stride,
                           K: tl.constexpr, FLIP: tl.constexpr, HAS_BIAS: tl.constexpr, ROUND_BIAS: tl.constexpr,
                           SILU: tl.constexpr, SAVE_PRE: tl.constexpr, INTERPRETED: tl.constexpr,
                           BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # b * height + h
        h = row % height
        w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < channels
        pad: tl.constexpr = K // 2
        pixel_offsets = w[:, None] * channels + c[None, :]  # within an output row
        x_offsets = w[:, None] * x_pixel_stride + c[None, :]  # within an input row
        acc = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
        for kh in range(K):  # a loop, not unrolled: K² unrolled taps keep too many tiles live (register spills)
            ih = h + kh - pad
            row_ok = (ih >= 0) & (ih < height)
            x_row = x_ptr + (row + kh - pad) * width * x_pixel_stride
            for kw in tl.static_range(K):
                iw = w + (kw - pad)
                ok = row_ok & (iw >= 0) & (iw < width)
                xv = tl.load(x_row + x_offsets + (kw - pad) * x_pixel_stride, mask=ok[:, None] & c_ok[None, :],
                             other=0.0)
                tap = (K * K - 1 - (kh * K + kw)) if FLIP else (kh * K + kw)
                wv = tl.load(w_ptr + tap * channels + c, mask=c_ok, other=0.0).to(tl.float32)
                acc += xv.to(tl.float32) * wv[None, :]
        if HAS_BIAS:
            bv = tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
            if ROUND_BIAS:  # autocast: the bias as the input's dtype would hold it
                bv = bv.to(x_ptr.dtype.element_ty).to(tl.float32)
            acc += bv[None, :]
        out = acc.to(y_ptr.dtype.element_ty)
        out_offsets = row * width * channels + pixel_offsets
        out_ok = (w < width)[:, None] & c_ok[None, :]
        if SILU:  # SiLU of the rounded convolution, rounding for rounding as PyTorch's CUDA silu
            if SAVE_PRE:  # the convolution itself, which the SiLU's backward reads
                tl.store(pre_ptr + out_offsets, out, mask=out_ok)
            out = silu_f32(out.to(tl.float32), INTERPRETED).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + out_offsets, out, mask=out_ok)

    @fast_launch
    @triton.jit
    def _dwconv_wgrad_kernel(g_ptr, x_ptr, wpart_ptr, bpart_ptr, part_stride, rows, height, width, channels,
                             x_pixel_stride, K: tl.constexpr, K_TILE: tl.constexpr, LAST_APART: tl.constexpr,
                             BAND: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_W: tl.constexpr,
                             BLOCK_C: tl.constexpr):
        """Partial weight (and bias) gradient sums of one band of rows: row ``band`` of the float32
        partials, ``part_stride`` apart, holds the weight's (C, K·K) at ``wpart_ptr`` and the bias's
        (C) at ``bpart_ptr``."""
        band = tl.program_id(0).to(tl.int64)
        kh = tl.program_id(1)
        c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < channels
        pad: tl.constexpr = K // 2
        kw = tl.arange(0, K_TILE)  # the taps of the block; with LAST_APART the last tap K - 1 has its own tile
        w_tile = tl.arange(0, BLOCK_W)
        # acc[kw, pixel, channel]: the tap (kh, kw) products, summed over pixels only at the end.
        acc = tl.zeros([K_TILE, BLOCK_W, BLOCK_C], dtype=tl.float32)
        acc_last = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
        acc_bias = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
        for row in range(band * BAND, tl.minimum(band * BAND + BAND, rows)):
            h = row % height
            ih = h + kh - pad
            g_row = g_ptr + row * width * channels
            x_row = x_ptr + (row + kh - pad) * width * x_pixel_stride
            row_ok = (ih >= 0) & (ih < height)
            for w0 in range(0, width, BLOCK_W):
                w = w0 + w_tile
                g = tl.load(g_row + w[:, None] * channels + c[None, :], mask=(w < width)[:, None] & c_ok[None, :],
                            other=0.0).to(tl.float32)
                if HAS_BIAS:
                    acc_bias += g
                iw = w[None, :] + kw[:, None] - pad  # [kw, pixel]
                ok = row_ok & (kw[:, None] < K) & (iw >= 0) & (iw < width)
                xv = tl.load(x_row + iw[:, :, None] * x_pixel_stride + c[None, None, :],
                             mask=ok[:, :, None] & c_ok[None, None, :], other=0.0)
                acc += xv.to(tl.float32) * g[None, :, :]
                if LAST_APART:
                    iw_last = w + (K - 1 - pad)
                    ok_last = row_ok & (iw_last < width)
                    x_last = tl.load(x_row + iw_last[:, None] * x_pixel_stride + c[None, :],
                                     mask=ok_last[:, None] & c_ok[None, :], other=0.0)
                    acc_last += x_last.to(tl.float32) * g
        wpart_row = wpart_ptr + band * part_stride + c * (K * K) + kh * K  # [channel]: the taps (kh, ·)
        tl.store(wpart_row[None, :] + kw[:, None], tl.sum(acc, axis=1), mask=(kw < K)[:, None] & c_ok[None, :])
        if LAST_APART:
            tl.store(wpart_row + (K - 1), tl.sum(acc_last, axis=0), mask=c_ok)
        if HAS_BIAS:
            tl.store(bpart_ptr + band * part_stride + c, tl.sum(acc_bias, axis=0), mask=c_ok & (kh == 0))


def pixel_stride(x: torch.Tensor) -> Optional[int]:
    """For x (B, C, H, W) stored as channels-last pixels: the distance P between neighbouring pixels
    (C for a dense channels-last map; more for the channel slice of a wider channels-last tensor,
    such as one half of a linear layer's output). None for any other layout."""
    batch, channels, height, width = x.shape
    if x.is_contiguous(memory_format=torch.channels_last):
        return channels
    s_batch, s_channel, s_row, s_pixel = x.stride()
    if (min(channels, height, width) > 1 and s_channel == 1 and s_pixel >= channels and s_row == width * s_pixel
            and (batch == 1 or s_batch == height * width * s_pixel)):
        return s_pixel
    return None


def _channel_block(channels: int, largest: int) -> int:
    """Channels per tile: the largest of ``largest``, 32, 16 that divides the channels (no idle lanes
    at 48 or 96 channels), else ``largest``."""
    for block in (largest, 32, 16):
        if block <= largest and channels % block == 0:
            return block
    return largest


def _tiles(width: int, channels: int) -> tuple[int, int, int]:
    """(BLOCK_W, BLOCK_C, num_warps): a row tile of up to 64 pixels × 16 to 64 channels."""
    block_w = min(64, next_power_of_2(width))
    block_c = _channel_block(channels, 32 if channels <= 96 else 64)
    num_warps = max(1, min(4, block_w * block_c // 256))
    return block_w, block_c, num_warps


def _wgrad_taps(kernel_size: int) -> tuple[int, bool]:
    """(K_TILE, LAST_APART): the taps of a kernel row as one power-of-two block, plus the last tap in
    a tile of its own when that avoids padding (9 = 8 + 1, 5 = 4 + 1, 3 = 2 + 1; 7 is padded to 8)."""
    if kernel_size > 1 and (kernel_size - 1) & (kernel_size - 2) == 0:
        return kernel_size - 1, True
    return next_power_of_2(kernel_size), False


def _conv(x: torch.Tensor, taps: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype,
          kernel_size: int, flip: bool, silu: bool = False, pre: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The convolution (dense channels-last, ``out_dtype``); with ``silu`` its SiLU, and the
    convolution itself written to ``pre`` too when given."""
    batch, channels, height, width = x.shape
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device, memory_format=torch.channels_last)
    block_w, block_c, num_warps = _tiles(width, channels)
    grid = (batch * height, cdiv(width, block_w), cdiv(channels, block_c))
    _dwconv_fwd_kernel[grid](x, taps, bias if bias is not None else taps, y, pre if pre is not None else y,
                             height, width, channels, pixel_stride(x),
                             K=kernel_size, FLIP=flip, HAS_BIAS=bias is not None,
                             ROUND_BIAS=bias is not None and bias.dtype != x.dtype, SILU=silu,
                             SAVE_PRE=pre is not None, INTERPRETED=silu and interpreting(), BLOCK_W=block_w,
                             BLOCK_C=block_c, num_warps=num_warps)
    return y


def _taps(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(C, 1, K, K) weight → (K·K, C) in ``dtype``: each tap's weights contiguous over the channels, as
    the tiles read them (a load per tap instead of a gather across C rows of K·K values). Under
    autocast ``dtype`` is the maps' half dtype, so the weights are rounded as autocast rounds them,
    in the same copy."""
    channels, _, k, _ = weight.shape
    taps = torch.empty((k * k, channels), dtype=dtype, device=weight.device)
    return taps.copy_(weight.detach().reshape(channels, k * k).t())


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype,
             silu: bool, save_pre: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The output (with ``silu``, the SiLU of the convolution), the taps (kept for the backward,
    which reads the same taps flipped) and, with ``silu`` and ``save_pre``, the convolution before
    the SiLU, which the SiLU's backward reads (else an empty tensor)."""
    taps = _taps(weight, x.dtype)
    pre = (torch.empty(x.shape, dtype=out_dtype, device=x.device, memory_format=torch.channels_last)
           if silu and save_pre else x.new_empty((0,), dtype=out_dtype))
    y = _conv(x, taps, bias, out_dtype, weight.shape[-1], False, silu=silu, pre=pre if pre.numel() else None)
    return y, taps, pre


def _forward_fake(x, weight, bias, out_dtype, silu, save_pre):
    channels, _, k, _ = weight.shape
    pre = (torch.empty_like(x, dtype=out_dtype, memory_format=torch.channels_last) if silu and save_pre
           else x.new_empty((0,), dtype=out_dtype))
    return torch.empty_like(x, dtype=out_dtype, memory_format=torch.channels_last), x.new_empty((k * k, channels)), pre


def _gradients(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, taps: torch.Tensor,
               has_bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient of x (channels-last, x's dtype; the forward's taps, flipped) and, flat in one
    float32 tensor, those of the weight (C·K·K) and of the bias (C; none without a bias): a custom
    op's outputs may not alias each other, so :func:`_backward` splits them."""
    batch, channels, height, width = x.shape
    k = weight.shape[-1]
    grad = grad.contiguous(memory_format=torch.channels_last).to(x.dtype)
    dx = _conv(grad, taps, None, x.dtype, k, True)
    k_tile, last_apart = _wgrad_taps(k)
    block_w = min(next_power_of_2(width), max(1, _WGRAD_TILE // k_tile))
    block_c = _channel_block(channels, _WGRAD_BLOCK_C)
    rows = batch * height
    bands = cdiv(rows, _BAND_ROWS)
    # Per band, the partial weight sums (C·K·K) and then the bias's (C) in one row: one reduction
    # finishes both.
    taps = channels * k * k
    parts = torch.empty((bands, taps + (channels if has_bias else 0)), dtype=torch.float32, device=x.device)
    grid = (bands, k, cdiv(channels, block_c))
    _dwconv_wgrad_kernel[grid](grad, x, parts, parts[:, taps:] if has_bias else parts, parts.stride(0), rows,
                               height, width, channels, pixel_stride(x),
                               K=k, K_TILE=k_tile, LAST_APART=last_apart, BAND=_BAND_ROWS, HAS_BIAS=has_bias,
                               BLOCK_W=block_w, BLOCK_C=block_c, num_warps=4)
    return dx, parts.sum(0)


def _gradients_fake(grad, x, weight, taps, has_bias):
    return (torch.empty_like(x, memory_format=torch.channels_last),
            weight.new_empty((weight.numel() + (weight.shape[0] if has_bias else 0),), dtype=torch.float32))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, _out_dtype, silu, save_pre = inputs
    _y, taps, pre = output
    if silu and not save_pre:
        raise RuntimeError("depthwise_conv2d with SiLU: the convolution before the SiLU was not kept for the "
                           "backward (save_pre=False while a gradient is needed)")
    ctx.save_for_backward(x, weight, taps, pre if silu else None)
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.mark_non_differentiable(taps, pre)


def _backward(ctx, gradients: Callable, grad: torch.Tensor, _dtaps: Optional[torch.Tensor],
              _dpre: Optional[torch.Tensor]):
    x, weight, taps, pre = ctx.saved_tensors
    if pre is not None:  # through the SiLU first, as autograd's own SiLU node computes it
        grad = torch.ops.aten.silu_backward(grad.to(pre.dtype), pre)
    has_bias = ctx.bias_dtype is not None
    dx, sums = gradients(grad, x, weight, taps, has_bias)
    dweight, dbias = sums[:weight.numel()].view(weight.shape), sums[weight.numel():]
    return dx, dweight.to(weight.dtype), dbias.to(ctx.bias_dtype) if has_bias else None, None, None, None


_conv_op = kernel_op("depthwise_conv2d", _forward, _forward_fake, setup_context=_setup_context, backward=_backward,
                     backward_impl=_gradients, backward_fake=_gradients_fake)


def depthwise_conv2d_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            out_dtype: torch.dtype, silu: bool = False) -> torch.Tensor:
    """Depthwise convolution of a channels-last x (B, C, H, W) with a (C, 1, K, K) weight (odd K,
    padding K//2), accumulated in float32; the output (dense channels-last) in ``out_dtype``. x may
    be the channel slice of a wider channels-last tensor (see :func:`pixel_stride`). A float32
    weight with a half-precision x and output is rounded to x's dtype first (autocast's rule).
    With ``silu``, ``F.silu`` of that output, applied as the kernel writes it (the convolution is
    kept for the backward only when a gradient is needed)."""
    check_launch("depthwise convolution", x)
    if pixel_stride(x) is None:
        raise ValueError("the Triton depthwise convolution takes channels-last inputs (channels contiguous, "
                         f"pixels evenly spaced); got strides {x.stride()} for shape {tuple(x.shape)}")
    save_pre = bool(silu) and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias))
    return _conv_op(x, weight, bias, out_dtype, bool(silu), save_pre)[0]
