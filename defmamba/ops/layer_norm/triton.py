"""Triton kernels of :func:`defmamba.ops.layer_norm.layer_norm` and ``layer_norm_gelu``.

LayerNorm over the last dim of a contiguous x (float32/float16/bfloat16; rows of at most
:data:`MAX_COLUMNS`), float32 statistics, output in the dtype asked for; optionally the exact GELU
of it, and optionally of x scaled per image and channel. The backward recomputes the normalised
values (nothing is stored for GELU) and sums the parameter gradients per program, then over
programs. Design: docs/ops.md.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..drop_path.triton import inverse_keep_prob  # 1 / keep_prob as the drop-path kernels round it
from ..kernel_op import kernel_op
from ..triton_math import gelu as _gelu, gelu_grad as _gelu_grad
from ..triton_launch import fast_launch
from ..triton_support import cdiv, check_launch, next_power_of_2, tl, triton

__all__ = ["MAX_COLUMNS", "layer_norm_triton", "residual_layer_norm_triton"]

_TILE = 4096  # values per program tile
MAX_COLUMNS = 8192  # wider rows fall back to PyTorch (one tile row would not fit in registers)
_BWD_PROGRAMS = 1024  # programs of the backward, each with its own partial weight/bias gradient row


if triton is not None:

    @triton.jit
    def _sample_scale(kept_ptr, r, row_ok, rows_per_image, inv_keep):
        """The drop-path scale s[b] of each row's image b in float32: kept[b] / keep_prob rounded to
        the mask's (branch's) dtype, as ops/drop_path/ computes it."""
        kept = tl.load(kept_ptr + (r // rows_per_image).to(tl.int64), mask=row_ok, other=0.0).to(tl.float32)
        return (kept * inv_keep).to(kept_ptr.dtype.element_ty).to(tl.float32)

    @fast_launch
    @triton.jit
    def _ln_fwd_kernel(x_ptr, w_ptr, b_ptr, s_ptr, y_ptr, mean_ptr, rstd_ptr, branch_ptr, kept_ptr, sum_ptr,
                       rows, cols, rows_per_image, eps, inv_keep,
                       ROWS: tl.constexpr, BLOCK_N: tl.constexpr, GELU: tl.constexpr, SCALED: tl.constexpr,
                       RESIDUAL: tl.constexpr, DROP: tl.constexpr):
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        c = tl.arange(0, BLOCK_N)
        row_ok = r < rows
        col_ok = c < cols
        mask = row_ok[:, None] & col_ok[None, :]
        offs = r.to(tl.int64)[:, None] * cols + c[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if RESIDUAL:  # the norm of x + branch (· the drop-path scale), the sum written in sum_ptr's dtype
            branch = tl.load(branch_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if DROP:
                branch = branch * _sample_scale(kept_ptr, r, row_ok, rows_per_image, inv_keep)[:, None]
            total = (x + branch).to(sum_ptr.dtype.element_ty)
            tl.store(sum_ptr + offs, total, mask=mask)
            x = total.to(tl.float32)
        if SCALED:  # x · s[image of the row]
            image = r // rows_per_image
            x = x * tl.load(s_ptr + image.to(tl.int64)[:, None] * cols + c[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / cols
        xc = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / cols
        rstd = 1.0 / tl.sqrt(var + eps)
        w = tl.load(w_ptr + c, mask=col_ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + c, mask=col_ok, other=0.0).to(tl.float32)
        y = xc * rstd[:, None] * w[None, :] + b[None, :]
        if GELU:
            y = _gelu(y)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(mean_ptr + r, mean, mask=row_ok)
        tl.store(rstd_ptr + r, rstd, mask=row_ok)

    @fast_launch
    @triton.jit
    def _ln_bwd_kernel(dy_ptr, x_ptr, w_ptr, b_ptr, s_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_part_ptr, db_part_ptr,
                       ds_part_ptr, dsum_ptr, kept_ptr, dbranch_ptr, rows, cols, segment_rows, rows_per_image, inv_keep,
                       ROWS: tl.constexpr, BLOCK_N: tl.constexpr, GELU: tl.constexpr, SCALED: tl.constexpr,
                       RESIDUAL: tl.constexpr, HAS_DSUM: tl.constexpr, DROP: tl.constexpr):
        segment = tl.program_id(0)  # with SCALED: the image
        pid = tl.program_id(1)
        n_prog = tl.num_programs(1)
        part = segment * n_prog + pid  # this program's partial row
        segment_start = segment * segment_rows
        segment_end = tl.minimum(segment_start + segment_rows, rows)
        c = tl.arange(0, BLOCK_N)
        col_ok = c < cols
        w = tl.load(w_ptr + c, mask=col_ok, other=0.0).to(tl.float32)
        if GELU:
            b = tl.load(b_ptr + c, mask=col_ok, other=0.0).to(tl.float32)
        if SCALED:
            s = tl.load(s_ptr + segment.to(tl.int64) * cols + c, mask=col_ok, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        db = tl.zeros([BLOCK_N], dtype=tl.float32)
        ds = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(segment_start + pid * ROWS, segment_end, n_prog * ROWS):
            r = start + tl.arange(0, ROWS)
            row_ok = r < segment_end
            mask = row_ok[:, None] & col_ok[None, :]
            offs = r.to(tl.int64)[:, None] * cols + c[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if SCALED:
                x_read = x
                x = x * s[None, :]
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + r, mask=row_ok, other=0.0)
            rstd = tl.load(rstd_ptr + r, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            if GELU:  # the normalised value is recomputed, not stored: dy is the gradient at GELU's input
                dy = dy * _gelu_grad(xhat * w[None, :] + b[None, :])
            wdy = dy * w[None, :]
            c1 = tl.sum(xhat * wdy, axis=1) / cols
            c2 = tl.sum(wdy, axis=1) / cols
            dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            if SCALED:  # dx is the gradient of x · s: d s = Σ dx · x, d x = dx · s
                ds += tl.sum(dx * x_read, axis=0)
                dx = dx * s[None, :]
            dx = dx.to(dx_ptr.dtype.element_ty)
            if RESIDUAL:  # x = res + branch · scale: both get the sum's gradient, this norm's plus dsum
                if HAS_DSUM:  # added as autograd adds the two: in float32, rounded to the sum's dtype
                    dsum = tl.load(dsum_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                    dx = (dx.to(tl.float32) + dsum).to(dx_ptr.dtype.element_ty)
                dbranch = dx.to(tl.float32)
                if DROP:
                    dbranch = dbranch * _sample_scale(kept_ptr, r, row_ok, rows_per_image, inv_keep)[:, None]
                tl.store(dbranch_ptr + offs, dbranch.to(dbranch_ptr.dtype.element_ty), mask=mask)
            tl.store(dx_ptr + offs, dx, mask=mask)
            dw += tl.sum(dy * xhat, axis=0)
            db += tl.sum(dy, axis=0)
        tl.store(dw_part_ptr + part * cols + c, dw, mask=col_ok)
        tl.store(db_part_ptr + part * cols + c, db, mask=col_ok)
        if SCALED:
            tl.store(ds_part_ptr + part * cols + c, ds, mask=col_ok)


def _tile(cols: int) -> tuple[int, int, int]:
    block_n = next_power_of_2(cols)
    rows_per_tile = max(1, _TILE // block_n)
    num_warps = 4 if block_n * rows_per_tile <= 4096 else 8
    return rows_per_tile, block_n, num_warps


def _rows_per_image(x: torch.Tensor) -> int:
    return max(1, x.numel() // (x.shape[0] * x.shape[-1])) if x.dim() > 1 else 1


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: Optional[torch.Tensor], eps: float,
             out_dtype: torch.dtype, gelu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the norm in ``out_dtype``, the float32 row means, the float32 reciprocal row deviations)."""
    cols = x.shape[-1]
    rows = x.numel() // cols
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    rows_per_tile, block_n, num_warps = _tile(cols)
    _ln_fwd_kernel[(cdiv(rows, rows_per_tile),)](x, weight, bias, scale if scale is not None else weight, y,
                                                 mean, rstd, x, x, x, rows, cols, _rows_per_image(x), eps, 1.0,
                                                 ROWS=rows_per_tile, BLOCK_N=block_n, GELU=gelu,
                                                 SCALED=scale is not None, RESIDUAL=False, DROP=False,
                                                 num_warps=num_warps)
    return y, mean, rstd


def _forward_fake(x, weight, bias, scale, eps, out_dtype, gelu):
    rows = x.numel() // x.shape[-1]
    return (x.new_empty(x.shape, dtype=out_dtype), x.new_empty((rows,), dtype=torch.float32),
            x.new_empty((rows,), dtype=torch.float32))


def _gradients(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               scale: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
               gelu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of x (x's dtype), of the weight and the bias stacked (2, C), and of the channel
    scale (float32; (0, C) without a scale). The weight and bias gradients come as one tensor
    because a custom op's outputs may not alias each other."""
    cols = x.shape[-1]
    rows = x.numel() // cols
    dy = dy.contiguous()
    rows_per_tile, block_n, num_warps = _tile(cols)
    # segments: all rows, or with a channel scale each image's rows (its gradient is a sum per image)
    segments = x.shape[0] if scale is not None else 1
    segment_rows = rows // segments
    programs = max(1, min(max(1, _BWD_PROGRAMS // segments), cdiv(segment_rows, rows_per_tile)))
    f32 = dict(dtype=torch.float32, device=x.device)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    # The weight and bias partial sums side by side, so that one reduction finishes both.
    parts = torch.empty((2, segments, programs, cols), **f32)
    dw_part, db_part = parts[0], parts[1]
    ds_part = torch.empty((segments, programs, cols), **f32) if scale is not None else dw_part
    _ln_bwd_kernel[(segments, programs)](dy, x, weight, bias, scale if scale is not None else weight, mean, rstd, dx,
                                         dw_part, db_part, ds_part, dy, dy, dy, rows, cols, segment_rows, 1, 1.0,
                                         ROWS=rows_per_tile, BLOCK_N=block_n, GELU=gelu, SCALED=scale is not None,
                                         RESIDUAL=False, HAS_DSUM=False, DROP=False, num_warps=num_warps)
    ds = ds_part.sum(1) if scale is not None else dw_part.new_empty((0, cols))  # (B, C); none without a scale
    return dx, parts.sum((1, 2)), ds


def _gradients_fake(dy, x, weight, bias, scale, mean, rstd, gelu):
    cols = x.shape[-1]
    return (x.new_empty(x.shape), x.new_empty((2, cols), dtype=torch.float32),
            x.new_empty((x.shape[0] if scale is not None else 0, cols), dtype=torch.float32))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, scale, _eps, _out_dtype, gelu = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, scale, mean, rstd)
    ctx.param_dtypes = (weight.dtype, bias.dtype, scale.dtype if scale is not None else None)
    ctx.gelu = gelu
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, gradients: Callable, dy: torch.Tensor, _dmean: torch.Tensor, _drstd: torch.Tensor):
    x, weight, bias, scale, mean, rstd = ctx.saved_tensors
    dx, (dw, db), ds = gradients(dy, x, weight, bias, scale, mean, rstd, ctx.gelu)
    w_dtype, b_dtype, s_dtype = ctx.param_dtypes
    return dx, dw.to(w_dtype), db.to(b_dtype), ds.to(s_dtype) if s_dtype is not None else None, None, None, None


_norm = kernel_op("layer_norm", _forward, _forward_fake, setup_context=_setup_context, backward=_backward,
                  backward_impl=_gradients, backward_fake=_gradients_fake)


def layer_norm_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                      out_dtype: torch.dtype, gelu: bool = False,
                      channel_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """LayerNorm of a contiguous x over its last dim (statistics in float32), output in ``out_dtype``;
    with ``gelu``, the exact GELU of it (computed in float32 before the output is rounded); with a
    ``channel_scale`` s (B, C), the norm of x · s[b] for the rows of image b (x's first dim)."""
    check_launch("LayerNorm", x)
    if not x.is_contiguous():
        raise ValueError("the Triton LayerNorm takes contiguous inputs")
    if channel_scale is not None:
        channel_scale = channel_scale.contiguous()
    return _norm(x, weight, bias, channel_scale, float(eps), out_dtype, bool(gelu))[0]


# x + branch (· a drop-path scale) and the LayerNorm of that sum in one pass each way.


def _residual_forward(x: torch.Tensor, branch: torch.Tensor, kept: Optional[torch.Tensor], keep_prob: float,
                      weight: torch.Tensor, bias: torch.Tensor, eps: float, out_dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x + branch · kept[b] / keep_prob in the wider dtype of x and branch (without ``kept``: x +
    branch), its norm in ``out_dtype``, the float32 row means and reciprocal deviations)."""
    cols = x.shape[-1]
    rows = x.numel() // cols
    total = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, branch.dtype), device=x.device)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    rows_per_tile, block_n, num_warps = _tile(cols)
    _ln_fwd_kernel[(cdiv(rows, rows_per_tile),)](x, weight, bias, weight, y, mean, rstd, branch,
                                                 kept if kept is not None else branch, total, rows, cols,
                                                 _rows_per_image(x), eps, inverse_keep_prob(keep_prob),
                                                 ROWS=rows_per_tile, BLOCK_N=block_n, GELU=False, SCALED=False,
                                                 RESIDUAL=True, DROP=kept is not None, num_warps=num_warps)
    return total, y, mean, rstd


def _residual_forward_fake(x, branch, kept, keep_prob, weight, bias, eps, out_dtype):
    rows = x.numel() // x.shape[-1]
    return (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, branch.dtype)),
            x.new_empty(x.shape, dtype=out_dtype), x.new_empty((rows,), dtype=torch.float32),
            x.new_empty((rows,), dtype=torch.float32))


def _residual_gradients(dy: torch.Tensor, dtotal: Optional[torch.Tensor], total: torch.Tensor,
                        kept: Optional[torch.Tensor], keep_prob: float, weight: torch.Tensor, bias: torch.Tensor,
                        mean: torch.Tensor, rstd: torch.Tensor, branch_dtype: torch.dtype
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of x (the sum's dtype: the norm's input gradient plus ``dtotal``, the gradient
    the sum gets elsewhere), of the branch (``branch_dtype``) and of the weight and bias stacked (2, C)."""
    cols = total.shape[-1]
    rows = total.numel() // cols
    dy = dy.contiguous()
    dtotal = dtotal.contiguous() if dtotal is not None else None
    rows_per_tile, block_n, num_warps = _tile(cols)
    programs = max(1, min(_BWD_PROGRAMS, cdiv(rows, rows_per_tile)))
    dx = torch.empty(total.shape, dtype=total.dtype, device=total.device)
    dbranch = torch.empty(total.shape, dtype=branch_dtype, device=total.device)
    parts = torch.empty((2, 1, programs, cols), dtype=torch.float32, device=total.device)
    dw_part, db_part = parts[0], parts[1]
    _ln_bwd_kernel[(1, programs)](dy, total, weight, bias, weight, mean, rstd, dx, dw_part, db_part, dw_part,
                                  dtotal if dtotal is not None else dy, kept if kept is not None else dy, dbranch,
                                  rows, cols, rows, _rows_per_image(total), inverse_keep_prob(keep_prob),
                                  ROWS=rows_per_tile, BLOCK_N=block_n, GELU=False, SCALED=False, RESIDUAL=True,
                                  HAS_DSUM=dtotal is not None, DROP=kept is not None, num_warps=num_warps)
    return dx, dbranch, parts.sum((1, 2))


def _residual_gradients_fake(dy, dtotal, total, kept, keep_prob, weight, bias, mean, rstd, branch_dtype):
    return (total.new_empty(total.shape), total.new_empty(total.shape, dtype=branch_dtype),
            total.new_empty((2, total.shape[-1]), dtype=torch.float32))


def _residual_setup_context(ctx, inputs, output) -> None:
    _x, branch, kept, keep_prob, weight, bias, _eps, _out_dtype = inputs
    total, _y, mean, rstd = output
    ctx.save_for_backward(total, kept, weight, bias, mean, rstd)
    ctx.keep_prob = keep_prob
    ctx.dtypes = (branch.dtype, weight.dtype, bias.dtype)
    ctx.mark_non_differentiable(mean, rstd)


def _residual_backward(ctx, gradients: Callable, dtotal: Optional[torch.Tensor], dy: Optional[torch.Tensor],
                       _dmean: Optional[torch.Tensor], _drstd: Optional[torch.Tensor]):
    total, kept, weight, bias, mean, rstd = ctx.saved_tensors
    branch_dtype, w_dtype, b_dtype = ctx.dtypes
    if dy is None:  # the norm's output took no part in the loss: its gradient is zero
        dy = torch.zeros(total.shape, dtype=torch.float32, device=total.device)
    dx, dbranch, (dw, db) = gradients(dy, dtotal, total, kept, ctx.keep_prob, weight, bias, mean, rstd, branch_dtype)
    return dx, dbranch, None, None, dw.to(w_dtype), db.to(b_dtype), None, None


_residual_norm = kernel_op("residual_layer_norm", _residual_forward, _residual_forward_fake,
                           setup_context=_residual_setup_context, backward=_residual_backward,
                           backward_impl=_residual_gradients, backward_fake=_residual_gradients_fake)


def residual_layer_norm_triton(x: torch.Tensor, branch: torch.Tensor, kept: Optional[torch.Tensor], keep_prob: float,
                               weight: torch.Tensor, bias: torch.Tensor, eps: float,
                               out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + branch · kept[b] / keep_prob, LayerNorm of it in ``out_dtype``) for contiguous x and branch of
    one shape: the sum in the wider dtype of the two (the scale rounded to branch's dtype, as
    ops/drop_path/ rounds it; ``kept`` None: no stochastic depth, the plain sum), the norm with
    float32 statistics. One kernel forward and one backward, which adds the sum's other gradient."""
    check_launch("LayerNorm", x)
    if not (x.is_contiguous() and branch.is_contiguous()) or x.shape != branch.shape:
        raise ValueError(f"the Triton residual LayerNorm takes contiguous x and branch of one shape; got "
                         f"{tuple(x.shape)} and {tuple(branch.shape)}")
    total, y, _mean, _rstd = _residual_norm(x, branch, kept, float(keep_prob), weight, bias, float(eps), out_dtype)
    return total, y
