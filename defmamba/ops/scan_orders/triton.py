"""Triton kernels of :func:`defmamba.ops.scan_orders.stack_scan_orders` and :func:`merge_and_gate`.

Each direction is one walk over tiles of tokens × channels: the stack writes the raster tokens and
the deformable sequence (B, L, D) into the three slices of the (B, 3, D, L) scan input; the merge
reads the three scan outputs at each token's place in each order, averages them in float32, rounds
the mean to the gate's dtype and writes the product with SiLU of the gate (B, L, D), the gate read
where it lies (rows of tokens with any token stride, such as a half of the in_proj output). Values
are the PyTorch formulation's, rounding for rounding (SiLU as x / (1 + exp(−x)) in float32 with
libdevice's exp and a correctly rounded division, PyTorch's CUDA formula, rounded to the gate's
dtype); gradients agree with it to float32 rounding. No atomics. Design: docs/ops.md.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..kernel_op import kernel_op
from ..triton_math import divide_rn, one_plus_exp_neg, silu
from ..triton_launch import fast_launch
from ..triton_support import cdiv, check_launch, interpreting, tl, triton
from .reference import NUM_ORDERS

__all__ = ["merge_and_gate_triton", "stack_scan_orders_triton"]

_BLOCK_L = 64  # tokens per program tile
_BLOCK_D = 32  # channels per program tile


if triton is not None:

    @fast_launch
    @triton.jit
    def _merge_gate_fwd_kernel(ys_ptr, inverse_ptr, z_ptr, out_ptr, mean_ptr, length, channels, z_stride,
                               BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, SAVE_MEAN: tl.constexpr,
                               INTERPRETED: tl.constexpr):
        l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
        b = tl.program_id(1).to(tl.int64)
        d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        l_ok = l < length
        mask = l_ok[:, None] & (d < channels)[None, :]
        rows = ys_ptr + ((b * 3 * channels + d) * length)[None, :]  # ys[b, 0, d, :]
        order_stride = channels * length
        slot = tl.load(inverse_ptr + b * length + l, mask=l_ok, other=0)
        raster = tl.load(rows + l[:, None], mask=mask, other=0.0).to(tl.float32)
        reverse = tl.load(rows + order_stride + (length - 1 - l)[:, None], mask=mask, other=0.0).to(tl.float32)
        deform = tl.load(rows + 2 * order_stride + slot[:, None], mask=mask, other=0.0).to(tl.float32)
        mean = ((raster + reverse + deform) / 3.0).to(z_ptr.dtype.element_ty)
        tokens = (b * length + l)[:, None] * channels + d[None, :]
        z = tl.load(z_ptr + (b * length + l)[:, None] * z_stride + d[None, :], mask=mask, other=0.0)
        zf = z.to(tl.float32)
        gate = silu(zf, INTERPRETED).to(z_ptr.dtype.element_ty)
        out = mean.to(tl.float32) * gate.to(tl.float32)
        tl.store(out_ptr + tokens, out.to(out_ptr.dtype.element_ty), mask=mask)
        if SAVE_MEAN:
            tl.store(mean_ptr + tokens, mean, mask=mask)

    @fast_launch
    @triton.jit
    def _merge_gate_bwd_kernel(grad_ptr, z_ptr, mean_ptr, inverse_ptr, dys_ptr, dz_ptr, length, channels, z_stride,
                               BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRETED: tl.constexpr):
        l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
        b = tl.program_id(1).to(tl.int64)
        d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        l_ok = l < length
        mask = l_ok[:, None] & (d < channels)[None, :]
        tokens = (b * length + l)[:, None] * channels + d[None, :]
        grad = tl.load(grad_ptr + tokens, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + (b * length + l)[:, None] * z_stride + d[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + tokens, mask=mask, other=0.0).to(tl.float32)
        # The gate's gradient in its dtype (the product's backward), then through SiLU:
        # d SiLU(z) / dz = s · (1 + z · (1 − s)) with s = sigmoid(z), PyTorch's formula.
        d_gate = (grad * mean).to(dz_ptr.dtype.element_ty).to(tl.float32)
        denominator = one_plus_exp_neg(z, INTERPRETED)
        s = divide_rn(1.0, denominator, INTERPRETED)
        tl.store(dz_ptr + tokens, (d_gate * s * (1.0 + z * (1.0 - s))).to(dz_ptr.dtype.element_ty), mask=mask)
        # The mean's gradient in the gate's dtype (the product's backward), then float32 / 3.
        gate = divide_rn(z, denominator, INTERPRETED).to(z_ptr.dtype.element_ty).to(tl.float32)
        g = (grad * gate).to(z_ptr.dtype.element_ty).to(tl.float32) / 3.0
        g = g.to(dys_ptr.dtype.element_ty)
        rows = dys_ptr + ((b * 3 * channels + d) * length)[None, :]
        order_stride = channels * length
        slot = tl.load(inverse_ptr + b * length + l, mask=l_ok, other=0)
        tl.store(rows + l[:, None], g, mask=mask)
        tl.store(rows + order_stride + (length - 1 - l)[:, None], g, mask=mask)
        tl.store(rows + 2 * order_stride + slot[:, None], g, mask=mask)


    @triton.jit
    def _stack_tile(xs_ptr, length, channels, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
        """This program's tokens l and channels d, their mask, the channels-last offsets of the
        tile and the pointers to its rows in the first order's slice of the (B, 3, D, L) tensor."""
        l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
        b = tl.program_id(1).to(tl.int64)
        d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = (l < length)[:, None] & (d < channels)[None, :]
        tokens = (b * length + l)[:, None] * channels + d[None, :]
        rows = xs_ptr + ((b * 3 * channels + d) * length)[None, :]  # xs[b, 0, d, :]
        return l, mask, tokens, rows

    @fast_launch
    @triton.jit
    def _stack_orders_fwd_kernel(x_ptr, seq_ptr, xs_ptr, length, channels,
                                 BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
        l, mask, tokens, rows = _stack_tile(xs_ptr, length, channels, BLOCK_L, BLOCK_D)
        x = tl.load(x_ptr + tokens, mask=mask, other=0.0).to(xs_ptr.dtype.element_ty)
        seq = tl.load(seq_ptr + tokens, mask=mask, other=0.0).to(xs_ptr.dtype.element_ty)
        order_stride = channels * length
        tl.store(rows + l[:, None], x, mask=mask)
        tl.store(rows + order_stride + (length - 1 - l)[:, None], x, mask=mask)
        tl.store(rows + 2 * order_stride + l[:, None], seq, mask=mask)

    @fast_launch
    @triton.jit
    def _stack_orders_bwd_kernel(dxs_ptr, dx_ptr, dseq_ptr, length, channels,
                                 BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
        l, mask, tokens, rows = _stack_tile(dxs_ptr, length, channels, BLOCK_L, BLOCK_D)
        order_stride = channels * length
        raster = tl.load(rows + l[:, None], mask=mask, other=0.0).to(tl.float32)
        reverse = tl.load(rows + order_stride + (length - 1 - l)[:, None], mask=mask, other=0.0).to(tl.float32)
        deform = tl.load(rows + 2 * order_stride + l[:, None], mask=mask, other=0.0)
        tl.store(dx_ptr + tokens, (raster + reverse).to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dseq_ptr + tokens, deform.to(dseq_ptr.dtype.element_ty), mask=mask)


def _launch_grid(batch: int, length: int, channels: int) -> tuple[int, int, int]:
    return cdiv(length, _BLOCK_L), batch, cdiv(channels, _BLOCK_D)


def _token_stride(z: torch.Tensor) -> int:
    """The stride between z's tokens (B, h, w, D), or 0 where z is not rows of tokens with unit
    channel stride and one token stride throughout (the wrapper then copies it). The strides of
    size-1 dims do not matter."""
    batch, h, w, channels = z.shape
    sizes, strides = (batch, h, w), z.stride()[:3]
    step = next((st // span for size, st, span in zip(reversed(sizes), reversed(strides), (1, w, h * w))
                 if size > 1), channels)
    spans = (h * w, w, 1)
    if channels > 1 and z.stride(3) != 1:
        return 0
    if step < channels or any(size > 1 and st != span * step for size, st, span in zip(sizes, strides, spans)):
        return 0
    return step


def _merge_forward(ys: torch.Tensor, inverse: torch.Tensor, z: torch.Tensor,
                   save_mean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(the merge times SiLU(z), dense in z's dtype; the merged mean in z's dtype if ``save_mean``,
    else an empty tensor)."""
    batch, _, channels, length = ys.shape
    out = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    mean = torch.empty(z.shape if save_mean else (0,), dtype=z.dtype, device=z.device)
    _merge_gate_fwd_kernel[_launch_grid(batch, length, channels)](
        ys, inverse, z, out, mean if save_mean else out, length, channels, _token_stride(z),
        BLOCK_L=_BLOCK_L, BLOCK_D=_BLOCK_D, SAVE_MEAN=save_mean, INTERPRETED=interpreting(), num_warps=4)
    return out, mean


def _merge_forward_fake(ys, inverse, z, save_mean):
    return torch.empty(z.shape, dtype=z.dtype, device=z.device), z.new_empty(z.shape if save_mean else (0,))


def _merge_gradients(grad: torch.Tensor, z: torch.Tensor, mean: torch.Tensor, inverse: torch.Tensor,
                     ys_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of ys (in ``ys_dtype``) and of z (dense)."""
    batch, channels = z.shape[0], z.shape[-1]
    length = z.numel() // (batch * channels)
    grad = grad.contiguous()
    dys = torch.empty((batch, NUM_ORDERS, channels, length), dtype=ys_dtype, device=z.device)
    dz = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    _merge_gate_bwd_kernel[_launch_grid(batch, length, channels)](
        grad, z, mean, inverse, dys, dz, length, channels, _token_stride(z), BLOCK_L=_BLOCK_L, BLOCK_D=_BLOCK_D,
        INTERPRETED=interpreting(), num_warps=4)
    return dys, dz


def _merge_gradients_fake(grad, z, mean, inverse, ys_dtype):
    batch, channels = z.shape[0], z.shape[-1]
    return (z.new_empty((batch, NUM_ORDERS, channels, z.numel() // (batch * channels)), dtype=ys_dtype),
            torch.empty(z.shape, dtype=z.dtype, device=z.device))


def _merge_setup_context(ctx, inputs, output) -> None:
    ys, inverse, z, _save_mean = inputs
    _out, mean = output
    ctx.save_for_backward(z, mean, inverse)
    ctx.ys_dtype = ys.dtype
    ctx.mark_non_differentiable(mean)


def _merge_backward(ctx, gradients: Callable, grad: torch.Tensor, _dmean: torch.Tensor):
    z, mean, inverse = ctx.saved_tensors
    if mean.numel() == 0 and z.numel() > 0:
        raise RuntimeError("merge_and_gate: the forward ran without a gradient and kept no mean, "
                           "so it cannot be differentiated")
    dys, dz = gradients(grad, z, mean, inverse, ctx.ys_dtype)
    return dys, None, dz, None


_merge_op = kernel_op("merge_and_gate", _merge_forward, _merge_forward_fake, setup_context=_merge_setup_context,
                      backward=_merge_backward, backward_impl=_merge_gradients, backward_fake=_merge_gradients_fake)


def merge_and_gate_triton(ys: torch.Tensor, inverse: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """:func:`defmamba.ops.scan_orders.merge_and_gate` through the Triton kernels (shapes checked
    there); z is read in place when its tokens are evenly strided rows (a channel slice of a wider
    channels-last tensor), copied otherwise."""
    check_launch("merge", ys)
    save_mean = torch.is_grad_enabled() and (ys.requires_grad or z.requires_grad)
    if not _token_stride(z):
        z = z.contiguous()
    out, _mean = _merge_op(ys.contiguous(), inverse.contiguous(), z, save_mean)
    return out


# ---- the input side: stack_scan_orders ----

def _stack_forward(x: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
    """The scan input (B, 3, D, L) in x's dtype from the raster tokens x and the sequence seq (B, L, D)."""
    batch, length, channels = x.shape
    xs = torch.empty((batch, NUM_ORDERS, channels, length), dtype=x.dtype, device=x.device)
    _stack_orders_fwd_kernel[_launch_grid(batch, length, channels)](
        x, seq, xs, length, channels, BLOCK_L=_BLOCK_L, BLOCK_D=_BLOCK_D, num_warps=4)
    return xs


def _stack_forward_fake(x, seq):
    batch, length, channels = x.shape
    return x.new_empty((batch, NUM_ORDERS, channels, length))


def _stack_gradients(dxs: torch.Tensor, x_dtype: torch.dtype,
                     seq_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of the raster tokens and of the sequence, (B, L, D) each in its input's dtype."""
    batch, _, channels, length = dxs.shape
    dxs = dxs.contiguous()
    dx = torch.empty((batch, length, channels), dtype=x_dtype, device=dxs.device)
    dseq = torch.empty((batch, length, channels), dtype=seq_dtype, device=dxs.device)
    _stack_orders_bwd_kernel[_launch_grid(batch, length, channels)](
        dxs, dx, dseq, length, channels, BLOCK_L=_BLOCK_L, BLOCK_D=_BLOCK_D, num_warps=4)
    return dx, dseq


def _stack_gradients_fake(dxs, x_dtype, seq_dtype):
    batch, _, channels, length = dxs.shape
    return (dxs.new_empty((batch, length, channels), dtype=x_dtype),
            dxs.new_empty((batch, length, channels), dtype=seq_dtype))


def _stack_setup_context(ctx, inputs, output) -> None:
    x, seq = inputs
    ctx.dtypes = (x.dtype, seq.dtype)


def _stack_backward(ctx, gradients: Callable, dxs: torch.Tensor):
    return gradients(dxs, *ctx.dtypes)


_stack_op = kernel_op("stack_scan_orders", _stack_forward, _stack_forward_fake, setup_context=_stack_setup_context,
                      backward=_stack_backward, backward_impl=_stack_gradients, backward_fake=_stack_gradients_fake)


def stack_scan_orders_triton(x: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
    """:func:`defmamba.ops.scan_orders.stack_scan_orders` for the raster map as contiguous (B, L, D)
    tokens and the sequence (B, L, D) (shapes checked there); (B, 3, D, L) in x's dtype."""
    check_launch("scan-order", x)
    return _stack_op(x.contiguous(), seq.contiguous())
