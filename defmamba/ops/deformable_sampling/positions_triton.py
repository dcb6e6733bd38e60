"""Triton kernels of :func:`defmamba.ops.deformable_sampling.sample_positions` (CUDA tensors).

One kernel turns the offset network's three maps into the sample points, the bias-table points and
the path positions, and one kernel gives the offsets' gradient from theirs: in PyTorch ops these
are seven launches forward and about a dozen backward (casts, tanh, flip, scale, three sums; the
slice, select and tanh gradients). Each value is rounded as the PyTorch formulation rounds it: a
product and a sum are two float32 roundings (no fused multiply-add), and tanh is libdevice's, the
function PyTorch's CUDA kernel calls.

:func:`sample_positions_and_table_triton` adds the bias table's resize to the forward kernel's
launch, as programs of their own after the positions' (the resize reads only the table and the
size's constants): the two small matmuls of ``ops/table_resize.py`` become no launch at all. Each
resized value is the matmuls' two-step sum over the (at most) two nonzero weights of its row and
column, first along x, then along y, in float32 whatever the TF32 setting. Its backward launch
likewise adds the table's gradient to the offsets': a program per table entry and block of
channels sums the resized table's gradient over the pixels whose weights can reach that entry
(:attr:`~defmamba.ops.table_resize.TableResize.span_y`), in place of two transposed matmuls.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..kernel_op import kernel_op
from ..table_resize import TableResize
from ..triton_launch import fast_launch
from ..triton_support import cdiv, check_launch, interpreting, next_power_of_2, tl, triton

__all__ = ["sample_positions_and_table_triton", "sample_positions_triton"]

_BLOCK = 256  # (image, token) pairs per program
_RESIZE_ELEMENTS = 2048  # resized table entries (pixels × channels) per program

if triton is not None:
    from triton.language.extra import libdevice

    @triton.jit
    def _tanh(x, INTERPRETED: tl.constexpr):
        """tanh in float32: libdevice's on the GPU; from exp under the interpreter, which has no libdevice."""
        if INTERPRETED:
            e = tl.exp(-2.0 * tl.abs(x))
            t = (1.0 - e) / (1.0 + e)
            result = tl.where(x < 0.0, -t, t)
        else:
            result = libdevice.tanh(x)
        return result

    @triton.jit
    def _load_offsets(off_ptr, i, ok, length, width, s_b, s_c, s_h, s_w, INTERPRETED: tl.constexpr):
        """tanh of the row, column and path offsets of the flat (image, token) indices i."""
        tok = i % length
        src = off_ptr + (i // length) * s_b + (tok // width) * s_h + (tok % width) * s_w
        t_row = _tanh(tl.load(src, mask=ok, other=0.0).to(tl.float32), INTERPRETED)
        t_col = _tanh(tl.load(src + s_c, mask=ok, other=0.0).to(tl.float32), INTERPRETED)
        t_path = _tanh(tl.load(src + 2 * s_c, mask=ok, other=0.0).to(tl.float32), INTERPRETED)
        return tok, t_row, t_col, t_path

    @triton.jit
    def _resize_block(pid, table_ptr, wy_ptr, wx_ptr, first_y_ptr, first_x_ptr, out_ptr, length, width, channels,
                      rows, cols, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """Program ``pid`` of the resize: BLOCK_P pixels × BLOCK_C channels of the (h, w, C) result of
        a (C, rows, cols) table and the (h, rows), (w, cols) weights (module docstring)."""
        channel_blocks = tl.cdiv(channels, BLOCK_C)
        p = (pid // channel_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
        c = (pid % channel_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
        p_ok = p < length
        i = p // width
        j = p % width
        fy = tl.load(first_y_ptr + i, mask=p_ok, other=0)
        fx = tl.load(first_x_ptr + j, mask=p_ok, other=0)
        y1_ok = p_ok & (fy + 1 < rows)
        x1_ok = p_ok & (fx + 1 < cols)
        wy0 = tl.load(wy_ptr + i * rows + fy, mask=p_ok, other=0.0)[:, None]
        wy1 = tl.load(wy_ptr + i * rows + fy + 1, mask=y1_ok, other=0.0)[:, None]
        wx0 = tl.load(wx_ptr + j * cols + fx, mask=p_ok, other=0.0)[:, None]
        wx1 = tl.load(wx_ptr + j * cols + fx + 1, mask=x1_ok, other=0.0)[:, None]
        c_ok = (c < channels)[None, :]
        corner = table_ptr + c[None, :] * (rows * cols) + (fy * cols + fx)[:, None]
        t00 = tl.load(corner, mask=p_ok[:, None] & c_ok, other=0.0).to(tl.float32)
        t01 = tl.load(corner + 1, mask=x1_ok[:, None] & c_ok, other=0.0).to(tl.float32)
        t10 = tl.load(corner + cols, mask=y1_ok[:, None] & c_ok, other=0.0).to(tl.float32)
        t11 = tl.load(corner + cols + 1, mask=(y1_ok & x1_ok)[:, None] & c_ok, other=0.0).to(tl.float32)
        # along x in each of the two table rows, then along y: the matmuls' order
        value = wy0 * (wx0 * t00 + wx1 * t01) + wy1 * (wx0 * t10 + wx1 * t11)
        tl.store(out_ptr + p[:, None] * channels + c[None, :], value.to(out_ptr.dtype.element_ty),
                 mask=p_ok[:, None] & c_ok)

    @triton.jit
    def _positions_block(pid, off_ptr, scale_ptr, ref_ptr, half_key_ptr, ref_path_ptr, grid_ptr, disp_ptr, path_ptr,
                         tokens, length, width, s_b, s_c, s_h, s_w, BLOCK: tl.constexpr, INTERPRETED: tl.constexpr):
        """Program ``pid`` of the positions: BLOCK (image, token) pairs."""
        i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # image · length + token
        ok = i < tokens
        tok, t_row, t_col, t_path = _load_offsets(off_ptr, i, ok, length, width, s_b, s_c, s_h, s_w, INTERPRETED)
        grid_x = t_col * tl.load(scale_ptr) + tl.load(ref_ptr + 2 * tok, mask=ok, other=0.0)
        grid_y = t_row * tl.load(scale_ptr + 1) + tl.load(ref_ptr + 2 * tok + 1, mask=ok, other=0.0)
        tl.store(grid_ptr + 2 * i, grid_x, mask=ok)
        tl.store(grid_ptr + 2 * i + 1, grid_y, mask=ok)
        tl.store(disp_ptr + 2 * i, tl.load(half_key_ptr + 2 * tok, mask=ok, other=0.0) - 0.5 * grid_x, mask=ok)
        tl.store(disp_ptr + 2 * i + 1, tl.load(half_key_ptr + 2 * tok + 1, mask=ok, other=0.0) - 0.5 * grid_y, mask=ok)
        tl.store(path_ptr + i, t_path + tl.load(ref_path_ptr + tok, mask=ok, other=0.0), mask=ok)

    @fast_launch
    @triton.jit
    def _positions_fwd_kernel(off_ptr, scale_ptr, ref_ptr, half_key_ptr, ref_path_ptr, grid_ptr, disp_ptr, path_ptr,
                              tokens, length, width, s_b, s_c, s_h, s_w,
                              table_ptr, wy_ptr, wx_ptr, first_y_ptr, first_x_ptr, resized_ptr, position_programs,
                              channels, rows, cols,
                              BLOCK: tl.constexpr, INTERPRETED: tl.constexpr, HAS_TABLE: tl.constexpr,
                              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """The positions' programs, then (HAS_TABLE) the table resize's."""
        pid = tl.program_id(0)
        if HAS_TABLE:
            if pid < position_programs:
                _positions_block(pid, off_ptr, scale_ptr, ref_ptr, half_key_ptr, ref_path_ptr, grid_ptr, disp_ptr,
                                 path_ptr, tokens, length, width, s_b, s_c, s_h, s_w, BLOCK, INTERPRETED)
            else:
                _resize_block(pid - position_programs, table_ptr, wy_ptr, wx_ptr, first_y_ptr, first_x_ptr,
                              resized_ptr, length, width, channels, rows, cols, BLOCK_P, BLOCK_C)
        else:
            _positions_block(pid, off_ptr, scale_ptr, ref_ptr, half_key_ptr, ref_path_ptr, grid_ptr, disp_ptr,
                             path_ptr, tokens, length, width, s_b, s_c, s_h, s_w, BLOCK, INTERPRETED)

    @triton.jit
    def _resize_grad_block(pid, grad_ptr, wy_ptr, wx_ptr, span_y_ptr, span_x_ptr, out_ptr, width, channels, rows,
                           cols, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr):
        """Program ``pid`` of the table's gradient: entry (r, s) of BLOCK_C channels of the (C, rows,
        cols) gradient, Σ over the (h, w, C) gradient's pixels (i, j) of weight_y[i, r] · weight_x[j, s]
        · grad[i, j, c], over the rows and columns of the spans that can weigh (r, s)."""
        channel_blocks = tl.cdiv(channels, BLOCK_C)
        cell = pid // channel_blocks  # r · cols + s
        r = cell // cols
        s = cell % cols
        c = (pid % channel_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < channels
        i_begin = tl.load(span_y_ptr + 2 * r)
        i_end = tl.load(span_y_ptr + 2 * r + 1)
        j_begin = tl.load(span_x_ptr + 2 * s)
        j_end = tl.load(span_x_ptr + 2 * s + 1)
        acc = tl.zeros((BLOCK_J, BLOCK_C), dtype=tl.float32)
        for i in range(i_begin, i_end):
            weight_i = tl.load(wy_ptr + i * rows + r)
            for j_start in range(j_begin, j_end, BLOCK_J):
                j = j_start + tl.arange(0, BLOCK_J)
                j_ok = j < j_end
                weight_j = tl.load(wx_ptr + j * cols + s, mask=j_ok, other=0.0)
                g = tl.load(grad_ptr + (i * width + j)[:, None] * channels + c[None, :],
                            mask=j_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
                acc += (weight_i * weight_j)[:, None] * g
        tl.store(out_ptr + c * (rows * cols) + cell, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=c_ok)

    @triton.jit
    def _offsets_grad_block(pid, off_ptr, scale_ptr, dgrid_ptr, ddisp_ptr, dpath_ptr, doff_ptr,
                            tokens, length, width, s_b, s_c, s_h, s_w, d_b, d_c, d_h, d_w,
                            BLOCK: tl.constexpr, INTERPRETED: tl.constexpr):
        """Program ``pid`` of the offsets' gradient: BLOCK (image, token) pairs."""
        i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = i < tokens
        tok, t_row, t_col, t_path = _load_offsets(off_ptr, i, ok, length, width, s_b, s_c, s_h, s_w, INTERPRETED)
        # A sample point's gradient: its own plus that of the table point (key - point) / 2.
        g_x = tl.load(dgrid_ptr + 2 * i, mask=ok, other=0.0) - 0.5 * tl.load(ddisp_ptr + 2 * i, mask=ok, other=0.0)
        g_y = (tl.load(dgrid_ptr + 2 * i + 1, mask=ok, other=0.0)
               - 0.5 * tl.load(ddisp_ptr + 2 * i + 1, mask=ok, other=0.0))
        g_row = (g_y * tl.load(scale_ptr + 1)) * (1.0 - t_row * t_row)
        g_col = (g_x * tl.load(scale_ptr)) * (1.0 - t_col * t_col)
        g_path = tl.load(dpath_ptr + i, mask=ok, other=0.0) * (1.0 - t_path * t_path)
        dst = doff_ptr + (i // length) * d_b + (tok // width) * d_h + (tok % width) * d_w
        out_type = doff_ptr.dtype.element_ty
        tl.store(dst, g_row.to(out_type), mask=ok)
        tl.store(dst + d_c, g_col.to(out_type), mask=ok)
        tl.store(dst + 2 * d_c, g_path.to(out_type), mask=ok)

    @fast_launch
    @triton.jit
    def _positions_bwd_kernel(off_ptr, scale_ptr, dgrid_ptr, ddisp_ptr, dpath_ptr, doff_ptr,
                              tokens, length, width, s_b, s_c, s_h, s_w, d_b, d_c, d_h, d_w,
                              dresized_ptr, wy_ptr, wx_ptr, span_y_ptr, span_x_ptr, dtable_ptr, position_programs,
                              channels, rows, cols,
                              BLOCK: tl.constexpr, INTERPRETED: tl.constexpr, HAS_TABLE: tl.constexpr,
                              BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr):
        """The offsets' gradient's programs, then (HAS_TABLE) those of the table's gradient."""
        pid = tl.program_id(0)
        if HAS_TABLE:
            if pid < position_programs:
                _offsets_grad_block(pid, off_ptr, scale_ptr, dgrid_ptr, ddisp_ptr, dpath_ptr, doff_ptr, tokens, length,
                                    width, s_b, s_c, s_h, s_w, d_b, d_c, d_h, d_w, BLOCK, INTERPRETED)
            else:
                _resize_grad_block(pid - position_programs, dresized_ptr, wy_ptr, wx_ptr, span_y_ptr, span_x_ptr,
                                   dtable_ptr, width, channels, rows, cols, BLOCK_J, BLOCK_C)
        else:
            _offsets_grad_block(pid, off_ptr, scale_ptr, dgrid_ptr, ddisp_ptr, dpath_ptr, doff_ptr, tokens, length,
                                width, s_b, s_c, s_h, s_w, d_b, d_c, d_h, d_w, BLOCK, INTERPRETED)


def _launch_grid(offsets: torch.Tensor) -> tuple[int]:
    return (cdiv(offsets.shape[0] * offsets.shape[2] * offsets.shape[3], _BLOCK),)


def _positions_outputs(offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, _, h, w = offsets.shape
    f32 = dict(dtype=torch.float32, device=offsets.device)
    return (torch.empty((batch, h, w, 2), **f32), torch.empty((batch, h, w, 2), **f32),
            torch.empty((batch, h * w), **f32))


def _forward(offsets: torch.Tensor, offset_scale_xy: torch.Tensor, reference_xy: torch.Tensor,
             half_key_xy: torch.Tensor, reference_path: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, _, h, w = offsets.shape
    grid, disp, path = _positions_outputs(offsets)
    _positions_fwd_kernel[_launch_grid(offsets)](
        offsets, offset_scale_xy, reference_xy, half_key_xy, reference_path, grid, disp, path,
        batch * h * w, h * w, w, *offsets.stride(), grid, grid, grid, grid, grid, grid, 0, 0, 0, 0,
        BLOCK=_BLOCK, INTERPRETED=interpreting(), HAS_TABLE=False, BLOCK_P=1, BLOCK_C=1, enable_fp_fusion=False)
    return grid, disp, path


def _forward_with_table(offsets: torch.Tensor, offset_scale_xy: torch.Tensor, reference_xy: torch.Tensor,
                        half_key_xy: torch.Tensor, reference_path: torch.Tensor, table: torch.Tensor,
                        weight_y: torch.Tensor, weight_x: torch.Tensor, first_y: torch.Tensor, first_x: torch.Tensor,
                        span_y: torch.Tensor, span_x: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The positions and the (h, w, C) resized table (in the table's dtype) in one launch."""
    batch, _, h, w = offsets.shape
    channels, rows, cols = table.shape
    grid, disp, path = _positions_outputs(offsets)
    resized = torch.empty((h, w, channels), dtype=table.dtype, device=table.device)
    block_c = min(64, next_power_of_2(channels))
    block_p = _RESIZE_ELEMENTS // block_c
    position_programs = _launch_grid(offsets)[0]
    programs = position_programs + cdiv(h * w, block_p) * cdiv(channels, block_c)
    _positions_fwd_kernel[(programs,)](
        offsets, offset_scale_xy, reference_xy, half_key_xy, reference_path, grid, disp, path,
        batch * h * w, h * w, w, *offsets.stride(), table, weight_y, weight_x, first_y, first_x, resized,
        position_programs, channels, rows, cols,
        BLOCK=_BLOCK, INTERPRETED=interpreting(), HAS_TABLE=True, BLOCK_P=block_p, BLOCK_C=block_c,
        enable_fp_fusion=False)
    return grid, disp, path, resized


def _forward_with_table_fake(offsets, offset_scale_xy, reference_xy, half_key_xy, reference_path, table, weight_y,
                             weight_x, first_y, first_x, span_y, span_x):
    _, _, h, w = offsets.shape
    return (*_forward_fake(offsets, offset_scale_xy, reference_xy, half_key_xy, reference_path),
            table.new_empty((h, w, table.shape[0])))


def _forward_fake(offsets, offset_scale_xy, reference_xy, half_key_xy, reference_path):
    batch, _, h, w = offsets.shape
    f32 = dict(dtype=torch.float32)
    return (offsets.new_empty((batch, h, w, 2), **f32), offsets.new_empty((batch, h, w, 2), **f32),
            offsets.new_empty((batch, h * w), **f32))


def _gradient(offsets: torch.Tensor, offset_scale_xy: torch.Tensor, grad_grid: torch.Tensor, grad_disp: torch.Tensor,
              grad_path: torch.Tensor) -> torch.Tensor:
    """The offsets' gradient (offsets' dtype and layout) from the float32 gradients of the outputs."""
    grad = torch.empty_like(offsets)
    batch, _, h, w = offsets.shape
    _positions_bwd_kernel[_launch_grid(offsets)](
        offsets, offset_scale_xy, grad_grid.contiguous(), grad_disp.contiguous(), grad_path.contiguous(), grad,
        batch * h * w, h * w, w, *offsets.stride(), *grad.stride(), grad, grad, grad, grad, grad, grad, 0, 0, 0, 0,
        BLOCK=_BLOCK, INTERPRETED=interpreting(), HAS_TABLE=False, BLOCK_J=1, BLOCK_C=1, enable_fp_fusion=False)
    return grad


def _gradients_with_table(offsets: torch.Tensor, offset_scale_xy: torch.Tensor, grad_grid: torch.Tensor,
                          grad_disp: torch.Tensor, grad_path: torch.Tensor, grad_resized: torch.Tensor,
                          weight_y: torch.Tensor, weight_x: torch.Tensor, span_y: torch.Tensor, span_x: torch.Tensor,
                          table_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The offsets' gradient (as :func:`_gradient`) and the table's ((C, a, b), ``table_dtype``) from
    the (h, w, C) gradient of the resized table, in one launch."""
    grad = torch.empty_like(offsets)
    batch, _, h, w = offsets.shape
    channels, rows, cols = grad_resized.shape[2], weight_y.shape[1], weight_x.shape[1]
    grad_table = torch.empty((channels, rows, cols), dtype=table_dtype, device=offsets.device)
    block_c = min(64, next_power_of_2(channels))
    position_programs = _launch_grid(offsets)[0]
    programs = position_programs + rows * cols * cdiv(channels, block_c)
    _positions_bwd_kernel[(programs,)](
        offsets, offset_scale_xy, grad_grid.contiguous(), grad_disp.contiguous(), grad_path.contiguous(), grad,
        batch * h * w, h * w, w, *offsets.stride(), *grad.stride(), grad_resized.contiguous(), weight_y, weight_x,
        span_y, span_x, grad_table, position_programs, channels, rows, cols,
        BLOCK=_BLOCK, INTERPRETED=interpreting(), HAS_TABLE=True, BLOCK_J=_RESIZE_ELEMENTS // block_c,
        BLOCK_C=block_c, enable_fp_fusion=False)
    return grad, grad_table


def _gradients_with_table_fake(offsets, offset_scale_xy, grad_grid, grad_disp, grad_path, grad_resized, weight_y,
                               weight_x, span_y, span_x, table_dtype):
    return (torch.empty_like(offsets),
            offsets.new_empty((grad_resized.shape[2], weight_y.shape[1], weight_x.shape[1]), dtype=table_dtype))


def _gradient_fake(offsets, offset_scale_xy, grad_grid, grad_disp, grad_path):
    return torch.empty_like(offsets)


def _setup_context(ctx, inputs, output) -> None:
    offsets, offset_scale_xy, *_ = inputs
    ctx.save_for_backward(offsets, offset_scale_xy)


def _filled(offsets: torch.Tensor, grad_grid: Optional[torch.Tensor], grad_disp: Optional[torch.Tensor],
            grad_path: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The positions' gradients, zeros for an output the loss did not reach (None): it contributes zero."""
    batch, _, h, w = offsets.shape
    f32 = dict(dtype=torch.float32, device=offsets.device)
    return (grad_grid if grad_grid is not None else torch.zeros((batch, h, w, 2), **f32),
            grad_disp if grad_disp is not None else torch.zeros((batch, h, w, 2), **f32),
            grad_path if grad_path is not None else torch.zeros((batch, h * w), **f32))


def _backward(ctx, gradient: Callable, grad_grid: Optional[torch.Tensor], grad_disp: Optional[torch.Tensor],
              grad_path: Optional[torch.Tensor]):
    offsets, offset_scale_xy = ctx.saved_tensors
    return gradient(offsets, offset_scale_xy, *_filled(offsets, grad_grid, grad_disp, grad_path)), None, None, None, None


def _setup_context_with_table(ctx, inputs, output) -> None:
    offsets, offset_scale_xy, _, _, _, table, weight_y, weight_x, _, _, span_y, span_x = inputs
    ctx.save_for_backward(offsets, offset_scale_xy, weight_y, weight_x, span_y, span_x)
    ctx.table_dtype = table.dtype
    ctx.table_channels = table.shape[0]


def _backward_with_table(ctx, gradients: Callable, grad_grid: Optional[torch.Tensor],
                         grad_disp: Optional[torch.Tensor], grad_path: Optional[torch.Tensor],
                         grad_resized: Optional[torch.Tensor]):
    offsets, offset_scale_xy, weight_y, weight_x, span_y, span_x = ctx.saved_tensors
    if grad_resized is None:  # the table did not reach the loss
        grad_resized = torch.zeros((weight_y.shape[0], weight_x.shape[0], ctx.table_channels), dtype=torch.float32,
                                   device=offsets.device)
    grad_offsets, grad_table = gradients(offsets, offset_scale_xy, *_filled(offsets, grad_grid, grad_disp, grad_path),
                                         grad_resized, weight_y, weight_x, span_y, span_x, ctx.table_dtype)
    return (grad_offsets if ctx.needs_input_grad[0] else None, None, None, None, None,
            grad_table if ctx.needs_input_grad[5] else None, None, None, None, None, None, None)


_positions = kernel_op("sample_positions", _forward, _forward_fake, setup_context=_setup_context, backward=_backward,
                       backward_impl=_gradient, backward_fake=_gradient_fake)
_positions_with_table = kernel_op("sample_positions_and_table", _forward_with_table, _forward_with_table_fake,
                                  setup_context=_setup_context_with_table, backward=_backward_with_table,
                                  backward_impl=_gradients_with_table, backward_fake=_gradients_with_table_fake)


def sample_positions_triton(offsets: torch.Tensor, offset_scale_xy: torch.Tensor, reference_xy: torch.Tensor,
                            half_key_xy: torch.Tensor, reference_path: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`defmamba.ops.deformable_sampling.sample_positions` through the Triton kernels, for
    float32/float16/bfloat16 offsets of any layout and float32 constants (shapes checked there)."""
    check_launch("sample-position", offsets)
    return _positions(offsets, offset_scale_xy.contiguous(), reference_xy.contiguous(), half_key_xy.contiguous(),
                      reference_path.contiguous())


def sample_positions_and_table_triton(offsets: torch.Tensor, offset_scale_xy: torch.Tensor,
                                      reference_xy: torch.Tensor, half_key_xy: torch.Tensor,
                                      reference_path: torch.Tensor, table: torch.Tensor, resize: TableResize
                                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`defmamba.ops.deformable_sampling.sample_positions_and_table` through the Triton
    kernels (module docstring), for float32 constants and resize weights and a float32, float16 or
    bfloat16 table (shapes checked there)."""
    check_launch("sample-position", offsets)
    return _positions_with_table(offsets, offset_scale_xy.contiguous(), reference_xy.contiguous(),
                                 half_key_xy.contiguous(), reference_path.contiguous(), table.contiguous(),
                                 resize.weight_y.contiguous(), resize.weight_x.contiguous(),
                                 resize.first_y.contiguous(), resize.first_x.contiguous(), resize.span_y.contiguous(),
                                 resize.span_x.contiguous())
