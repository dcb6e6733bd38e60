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
column, first along x, then along y, in float32 whatever the TF32 setting. The table's gradient
stays the two transposed matmuls (:func:`~defmamba.ops.table_resize.resize_backward`).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..kernel_op import kernel_op
from ..table_resize import TableResize, resize_backward
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
            _positions_block(pid, off_ptr, scale_ptr, ref_ptr, half_key_ptr, ref_path_ptr, grid_ptr, disp_ptr, path_ptr,
                       tokens, length, width, s_b, s_c, s_h, s_w, BLOCK, INTERPRETED)

    @fast_launch
    @triton.jit
    def _positions_bwd_kernel(off_ptr, scale_ptr, dgrid_ptr, ddisp_ptr, dpath_ptr, doff_ptr,
                              tokens, length, width, s_b, s_c, s_h, s_w, d_b, d_c, d_h, d_w,
                              BLOCK: tl.constexpr, INTERPRETED: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
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
                        weight_y: torch.Tensor, weight_x: torch.Tensor, first_y: torch.Tensor, first_x: torch.Tensor
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
                             weight_x, first_y, first_x):
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
        batch * h * w, h * w, w, *offsets.stride(), *grad.stride(),
        BLOCK=_BLOCK, INTERPRETED=interpreting(), enable_fp_fusion=False)
    return grad


def _gradient_fake(offsets, offset_scale_xy, grad_grid, grad_disp, grad_path):
    return torch.empty_like(offsets)


def _setup_context(ctx, inputs, output) -> None:
    offsets, offset_scale_xy, *_ = inputs
    ctx.save_for_backward(offsets, offset_scale_xy)


def _offsets_gradient(gradient: Callable, offsets: torch.Tensor, offset_scale_xy: torch.Tensor,
                      grad_grid: Optional[torch.Tensor], grad_disp: Optional[torch.Tensor],
                      grad_path: Optional[torch.Tensor]) -> torch.Tensor:
    batch, _, h, w = offsets.shape
    zeros = dict(dtype=torch.float32, device=offsets.device)
    # An output the loss did not reach has no gradient (None): it contributes zero.
    grad_grid = grad_grid if grad_grid is not None else torch.zeros((batch, h, w, 2), **zeros)
    grad_disp = grad_disp if grad_disp is not None else torch.zeros((batch, h, w, 2), **zeros)
    grad_path = grad_path if grad_path is not None else torch.zeros((batch, h * w), **zeros)
    return gradient(offsets, offset_scale_xy, grad_grid, grad_disp, grad_path)


def _backward(ctx, gradient: Callable, grad_grid: Optional[torch.Tensor], grad_disp: Optional[torch.Tensor],
              grad_path: Optional[torch.Tensor]):
    offsets, offset_scale_xy = ctx.saved_tensors
    return _offsets_gradient(gradient, offsets, offset_scale_xy, grad_grid, grad_disp, grad_path), None, None, None, None


def _setup_context_with_table(ctx, inputs, output) -> None:
    offsets, offset_scale_xy, _, _, _, table, weight_y, weight_x, _, _ = inputs
    ctx.save_for_backward(offsets, offset_scale_xy, weight_y, weight_x)
    ctx.table_dtype = table.dtype


def _backward_with_table(ctx, gradient: Callable, grad_grid: Optional[torch.Tensor],
                         grad_disp: Optional[torch.Tensor], grad_path: Optional[torch.Tensor],
                         grad_resized: Optional[torch.Tensor]):
    offsets, offset_scale_xy, weight_y, weight_x = ctx.saved_tensors
    grad_offsets = grad_table = None
    if ctx.needs_input_grad[0] and any(g is not None for g in (grad_grid, grad_disp, grad_path)):
        grad_offsets = _offsets_gradient(gradient, offsets, offset_scale_xy, grad_grid, grad_disp, grad_path)
    if ctx.needs_input_grad[5] and grad_resized is not None:
        grad_table = resize_backward(grad_resized, weight_y, weight_x, ctx.table_dtype)
    return grad_offsets, None, None, None, None, grad_table, None, None, None, None


_positions = kernel_op("sample_positions", _forward, _forward_fake, setup_context=_setup_context, backward=_backward,
                       backward_impl=_gradient, backward_fake=_gradient_fake)
_positions_with_table = kernel_op("sample_positions_and_table", _forward_with_table, _forward_with_table_fake,
                                  setup_context=_setup_context_with_table, backward=_backward_with_table,
                                  backward_impl=_gradient, backward_fake=_gradient_fake)


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
                                 resize.first_y.contiguous(), resize.first_x.contiguous())
