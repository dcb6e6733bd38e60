"""Triton kernels of :func:`defmamba.ops.deformable_sampling.sample_in_path_order` (CUDA tensors,
float32/float16/bfloat16).

The forward writes the sequence (B, L, C) in path order in x's dtype, both samples summed in
float32, and the inverse of the token order (the sequence slot of each token) as it reads the
order. The backward gives float32 gradients of x, the sample points, the table and its points
(summed with atomics, so in no fixed order) and the path positions' surrogate gradient (two atomic
terms per entry onto zero: the same sum in either order). Coordinates follow
``grid_sample(mode="bilinear", padding_mode="zeros", align_corners=True)``: pixel = (g + 1) / 2 ·
(size − 1), corners outside the map read 0 and receive nothing. Design: docs/ops.md.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..kernel_op import kernel_op
from ..triton_launch import fast_launch
from ..triton_support import cdiv, check_launch, tl, triton
from .reference import sort_path

__all__ = ["sample_in_path_order_triton"]

_BLOCK_L_FWD, _BLOCK_C_FWD = 32, 64
_BLOCK_L_BWD, _BLOCK_C_BWD = 16, 64
_TABLE_PARTIALS = 8  # partial copies of the table gradient (images b, b + 8, ... share one)


if triton is not None:

    @triton.jit
    def _corners(px, py, size_w, size_h):
        """Pixel coordinates of a point, its north-west corner and the four bilinear weights."""
        ix = (px + 1.0) * 0.5 * (size_w - 1)
        iy = (py + 1.0) * 0.5 * (size_h - 1)
        ix0f = tl.floor(ix)
        iy0f = tl.floor(iy)
        ix0 = ix0f.to(tl.int32)
        iy0 = iy0f.to(tl.int32)
        wx1 = ix - ix0f  # weight of the east column
        wx0 = (ix0f + 1.0) - ix
        wy1 = iy - iy0f  # weight of the south row
        wy0 = (iy0f + 1.0) - iy
        return ix0, iy0, wx0, wx1, wy0, wy1

    @triton.jit
    def _token_corners(grid_ptr, disp_ptr, b, tok, slot_ok, length, size_w, size_h):
        """For each sequence slot's token ``tok``: the offset of its point in grid/disp, and _corners
        of the map point and of the table point."""
        point = b * length * 2 + tok * 2
        px = tl.load(grid_ptr + point, mask=slot_ok, other=0.0).to(tl.float32)
        py = tl.load(grid_ptr + point + 1, mask=slot_ok, other=0.0).to(tl.float32)
        qx = tl.load(disp_ptr + point, mask=slot_ok, other=0.0).to(tl.float32)
        qy = tl.load(disp_ptr + point + 1, mask=slot_ok, other=0.0).to(tl.float32)
        ix0, iy0, wx0, wx1, wy0, wy1 = _corners(px, py, size_w, size_h)
        jx0, jy0, vx0, vx1, vy0, vy1 = _corners(qx, qy, size_w, size_h)
        return point, ix0, iy0, wx0, wx1, wy0, wy1, jx0, jy0, vx0, vx1, vy0, vy1

    @triton.jit
    def _corner_backward(g, value_ptrs, dest_ptrs, ok, chan_ok, wx, wy, sign_x, sign_y):
        """One bilinear corner in the backward: atomically add g·wx·wy to its cell's gradient and
        return this corner's part of the point's gradient (d weight / d pixel x = ±wy, y: ±wx)."""
        m = ok[:, None] & chan_ok[None, :]
        v = tl.load(value_ptrs, mask=m, other=0.0).to(tl.float32)
        gv = tl.sum(g * v, axis=1)
        tl.atomic_add(dest_ptrs, g * (wx * wy)[:, None], mask=m, sem="relaxed")
        return gv * wy * sign_x, gv * wx * sign_y

    @fast_launch
    @triton.jit
    def _sampling_fwd_kernel(x_ptr, grid_ptr, table_ptr, disp_ptr, order_ptr, out_ptr, inverse_ptr,
                    length, channels, size_h, size_w,
                    sx_b, sx_c, sx_h, sx_w,
                    BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
        pid_l = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        pid_c = tl.program_id(2)
        slots = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
        chans = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        slot_ok = slots < length
        chan_ok = chans < channels
        x_img = x_ptr + b * sx_b + (chans * sx_c)[None, :]
        table_ch = table_ptr + chans[None, :]
        acc = tl.zeros([BLOCK_L, BLOCK_C], dtype=tl.float32)
        tok = tl.load(order_ptr + b * length + slots, mask=slot_ok, other=0)
        # The inverse permutation, inverse[b, order[b, j]] = j: written by the first channel block.
        tl.store(inverse_ptr + b * length + tok, slots.to(inverse_ptr.dtype.element_ty), mask=slot_ok & (pid_c == 0))
        # Map sample and table sample: the same bilinear rule on two (h, w) grids.
        _point, ix0, iy0, wx0, wx1, wy0, wy1, jx0, jy0, vx0, vx1, vy0, vy1 = _token_corners(
            grid_ptr, disp_ptr, b, tok, slot_ok, length, size_w, size_h)
        for dy in tl.static_range(2):
            for dx in tl.static_range(2):
                cx = ix0 + dx
                cy = iy0 + dy
                wgt = (wx1 if dx else wx0) * (wy1 if dy else wy0)
                ok = slot_ok & (cx >= 0) & (cx < size_w) & (cy >= 0) & (cy < size_h)
                v = tl.load(x_img + (cy.to(tl.int64) * sx_h + cx.to(tl.int64) * sx_w)[:, None],
                            mask=ok[:, None] & chan_ok[None, :], other=0.0).to(tl.float32)
                acc += v * wgt[:, None]
                ex = jx0 + dx
                ey = jy0 + dy
                wgt_t = (vx1 if dx else vx0) * (vy1 if dy else vy0)
                ok_t = slot_ok & (ex >= 0) & (ex < size_w) & (ey >= 0) & (ey < size_h)
                t = tl.load(table_ch + ((ey * size_w + ex).to(tl.int64) * channels)[:, None],
                            mask=ok_t[:, None] & chan_ok[None, :], other=0.0).to(tl.float32)
                acc += t * wgt_t[:, None]
        out = out_ptr + (b * length + slots.to(tl.int64))[:, None] * channels + chans[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=slot_ok[:, None] & chan_ok[None, :])

    @fast_launch
    @triton.jit
    def _sampling_bwd_kernel(grad_ptr, x_ptr, grid_ptr, table_ptr, disp_ptr, order_ptr,
                    gx_ptr, ggrid_ptr, gtable_ptr, gdisp_ptr, gpath_ptr,
                    length, channels, size_h, size_w, n_partials,
                    sg_b, sg_l, sg_c, sx_b, sx_c, sx_h, sx_w,
                    BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
        pid_l = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        slots = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
        slot_ok = slots < length
        tok = tl.load(order_ptr + b * length + slots, mask=slot_ok, other=0)
        point, ix0, iy0, wx0, wx1, wy0, wy1, jx0, jy0, vx0, vx1, vy0, vy1 = _token_corners(
            grid_ptr, disp_ptr, b, tok, slot_ok, length, size_w, size_h)
        # Offsets (without the channel) of the four corners in x, in the channels-last x gradient
        # and in the (h, w, C) table and its gradient; validity of each corner.
        ok_x0 = (ix0 >= 0) & (ix0 < size_w)
        ok_x1 = (ix0 + 1 >= 0) & (ix0 + 1 < size_w)
        ok_y0 = (iy0 >= 0) & (iy0 < size_h)
        ok_y1 = (iy0 + 1 >= 0) & (iy0 + 1 < size_h)
        ok_u0 = (jx0 >= 0) & (jx0 < size_w)
        ok_u1 = (jx0 + 1 >= 0) & (jx0 + 1 < size_w)
        ok_v0 = (jy0 >= 0) & (jy0 < size_h)
        ok_v1 = (jy0 + 1 >= 0) & (jy0 + 1 < size_h)
        partial = (b % n_partials) * size_h * size_w * channels

        grad_px = tl.zeros([BLOCK_L], dtype=tl.float32)
        grad_py = tl.zeros([BLOCK_L], dtype=tl.float32)
        grad_qx = tl.zeros([BLOCK_L], dtype=tl.float32)
        grad_qy = tl.zeros([BLOCK_L], dtype=tl.float32)
        slot_sum = tl.zeros([BLOCK_L], dtype=tl.float32)
        for c0 in range(0, channels, BLOCK_C):
            chans = c0 + tl.arange(0, BLOCK_C)
            chan_ok = chans < channels
            tile_ok = slot_ok[:, None] & chan_ok[None, :]
            g = tl.load(grad_ptr + b * sg_b + (slots.to(tl.int64) * sg_l)[:, None] + (chans * sg_c)[None, :],
                        mask=tile_ok, other=0.0).to(tl.float32)
            slot_sum += tl.sum(g, axis=1)
            for dy in tl.static_range(2):
                for dx in tl.static_range(2):
                    sign_x = 1.0 if dx else -1.0
                    sign_y = 1.0 if dy else -1.0
                    # The map corner: x at its strides, its gradient channels-last.
                    cx = (ix0 + dx).to(tl.int64)
                    cy = (iy0 + dy).to(tl.int64)
                    cell = ((b * size_h + cy) * size_w + cx) * channels
                    part_x, part_y = _corner_backward(
                        g, x_ptr + b * sx_b + (cy * sx_h + cx * sx_w)[:, None] + (chans * sx_c)[None, :],
                        gx_ptr + cell[:, None] + chans[None, :],
                        slot_ok & (ok_x1 if dx else ok_x0) & (ok_y1 if dy else ok_y0), chan_ok,
                        wx1 if dx else wx0, wy1 if dy else wy0, sign_x, sign_y)
                    grad_px += part_x
                    grad_py += part_y
                    # The table corner: table and its partial gradient, both (h, w, C).
                    cell_t = ((jy0 + dy) * size_w + (jx0 + dx)).to(tl.int64) * channels
                    part_x, part_y = _corner_backward(
                        g, table_ptr + cell_t[:, None] + chans[None, :],
                        gtable_ptr + partial + cell_t[:, None] + chans[None, :],
                        slot_ok & (ok_u1 if dx else ok_u0) & (ok_v1 if dy else ok_v0), chan_ok,
                        vx1 if dx else vx0, vy1 if dy else vy0, sign_x, sign_y)
                    grad_qx += part_x
                    grad_qy += part_y
        # pixel = (g + 1) / 2 · (size − 1): d pixel / d g = (size − 1) / 2
        scale_x = (size_w - 1) * 0.5
        scale_y = (size_h - 1) * 0.5
        tl.store(ggrid_ptr + point, grad_px * scale_x, mask=slot_ok)
        tl.store(ggrid_ptr + point + 1, grad_py * scale_y, mask=slot_ok)
        tl.store(gdisp_ptr + point, grad_qx * scale_x, mask=slot_ok)
        tl.store(gdisp_ptr + point + 1, grad_qy * scale_y, mask=slot_ok)
        # Path surrogate: gpath[m] = mean[m] - mean[inverse[m]] (channel means at sequence slots),
        # so slot j adds its mean at j and subtracts it at its token order[j]. Each entry gets
        # exactly these two terms onto zero; (0 + a) - b and (0 - b) + a are both a - b rounded once.
        slot_mean = slot_sum / channels
        tl.atomic_add(gpath_ptr + b * length + slots, slot_mean, mask=slot_ok, sem="relaxed")
        tl.atomic_add(gpath_ptr + b * length + tok, -slot_mean, mask=slot_ok, sem="relaxed")


def _forward(x: torch.Tensor, grid: torch.Tensor, table_hwc: torch.Tensor, disp: torch.Tensor, path: torch.Tensor,
             order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the sequence (B, L, C) in x's dtype, the inverse of ``order``); path is an input for the
    backward only."""
    batch, channels, h, w = x.shape
    length = h * w
    out = torch.empty((batch, length, channels), dtype=x.dtype, device=x.device)
    inverse = torch.empty((batch, length), dtype=order.dtype, device=order.device)
    launch = (cdiv(length, _BLOCK_L_FWD), batch, cdiv(channels, _BLOCK_C_FWD))
    _sampling_fwd_kernel[launch](x, grid, table_hwc, disp, order, out, inverse, length, channels, h, w, *x.stride(),
                                 BLOCK_L=_BLOCK_L_FWD, BLOCK_C=_BLOCK_C_FWD, num_warps=4)
    return out, inverse


def _forward_fake(x, grid, table_hwc, disp, path, order):
    batch, channels, h, w = x.shape
    return x.new_empty((batch, h * w, channels)), order.new_empty((batch, h * w))


def _accumulated_size(batch: int, length: int, channels: int) -> int:
    """Size of the one zero-filled float32 buffer the backward's atomics add into: the x gradient
    (B, h, w, C) at its start, the table's partial copies, then the path gradient (B, L) at its end,
    from a 16-byte boundary (where an allocation of its own would start)."""
    maps = (batch + min(batch, _TABLE_PARTIALS)) * length * channels
    return -(-maps // 4) * 4 + batch * length


def _gradients(grad: torch.Tensor, x: torch.Tensor, grid: torch.Tensor, table_hwc: torch.Tensor, disp: torch.Tensor,
               order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 gradients: the buffer of :func:`_accumulated_size` (those of x, channels-last, and of
    the path positions; one output, as a custom op's outputs may not share memory), then those of
    grid, the table ((h, w, C)) and disp."""
    batch, channels, h, w = x.shape
    length = h * w
    partials = min(batch, _TABLE_PARTIALS)
    f32 = dict(dtype=torch.float32, device=x.device)
    x_size, table_size = batch * length * channels, partials * length * channels
    accumulated = torch.zeros(_accumulated_size(batch, length, channels), **f32)
    grad_x, grad_path = accumulated[:x_size], accumulated[-batch * length:]
    grad_table = accumulated[x_size:x_size + table_size].view(partials, h, w, channels)
    grad_grid = torch.empty((batch, h, w, 2), **f32)
    grad_disp = torch.empty((batch, h, w, 2), **f32)
    launch = (cdiv(length, _BLOCK_L_BWD), batch)
    _sampling_bwd_kernel[launch](grad, x, grid, table_hwc, disp, order,
                                 grad_x, grad_grid, grad_table, grad_disp, grad_path,
                                 length, channels, h, w, partials, *grad.stride(), *x.stride(),
                                 BLOCK_L=_BLOCK_L_BWD, BLOCK_C=_BLOCK_C_BWD, num_warps=4)
    return accumulated, grad_grid, grad_table.sum(0), grad_disp


def _gradients_fake(grad, x, grid, table_hwc, disp, order):
    batch, channels, h, w = x.shape
    f32 = dict(dtype=torch.float32)
    return (x.new_empty((_accumulated_size(batch, h * w, channels),), **f32), x.new_empty((batch, h, w, 2), **f32),
            x.new_empty((h, w, channels), **f32), x.new_empty((batch, h, w, 2), **f32))


def _setup_context(ctx, inputs, output) -> None:
    x, grid, table_hwc, disp, path, order = inputs
    _seq, inverse = output
    ctx.save_for_backward(x, grid, table_hwc, disp, order)
    ctx.dtypes = (x.dtype, grid.dtype, table_hwc.dtype, disp.dtype, path.dtype)
    ctx.mark_non_differentiable(inverse)


def _backward(ctx, gradients: Callable, grad: torch.Tensor, _dinverse: Optional[torch.Tensor]):
    x, grid, table_hwc, disp, order = ctx.saved_tensors
    accumulated, grad_grid, grad_table, grad_disp = gradients(grad, x, grid, table_hwc, disp, order)
    batch, channels, h, w = x.shape  # the x gradient at the buffer's start, the path gradient at its end
    grad_x = accumulated[:batch * h * w * channels].view(batch, h, w, channels)
    grad_path = accumulated[-batch * h * w:].view(batch, h * w)
    x_dtype, grid_dtype, table_dtype, disp_dtype, path_dtype = ctx.dtypes
    return (grad_x.permute(0, 3, 1, 2).to(x_dtype), grad_grid.to(grid_dtype), grad_table.to(table_dtype),
            grad_disp.to(disp_dtype), grad_path.to(path_dtype), None)


_sample = kernel_op("deformable_sampling", _forward, _forward_fake, setup_context=_setup_context, backward=_backward,
                    backward_impl=_gradients, backward_fake=_gradients_fake)


def sample_in_path_order_triton(x: torch.Tensor, grid: torch.Tensor, table: torch.Tensor, disp: torch.Tensor,
                                path: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(seq, order, inverse) as :func:`defmamba.ops.deformable_sampling.sample_in_path_order` returns
    them (shapes checked there), through the Triton kernels: seq (B, L, C) in x's dtype (float32,
    float16 or bfloat16); ``order`` is the path's stable argsort (:func:`sort_path`), ``inverse``
    written by the forward kernel."""
    check_launch("deformable-sampling", x)
    if x.dtype == torch.float64:
        raise TypeError("the Triton deformable-sampling kernels take float32/float16/bfloat16; use the PyTorch "
                        "formulation for float64")
    order = sort_path(path)
    table_hwc = table.permute(1, 2, 0).contiguous()  # channels contiguous, like a channels-last map
    seq, inverse = _sample(x, grid.contiguous(), table_hwc, disp.contiguous(), path, order)
    return seq, order, inverse
