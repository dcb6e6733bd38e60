"""Triton kernels of :func:`defmamba.ops.channel_attention.channel_attention` (CUDA tensors).

sigmoid(fc2(GELU(fc1(p)))) for the (B, C) pooled maps p: one kernel forward, two backward (the
gradients of p, per block of images; the weight and bias gradients, per block of channels, summed
over the images). Products and activations in float32 whatever the input dtypes (the exact (erf)
GELU); the forward keeps fc1's output h in float32 for the backward, which recomputes GELU(h).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..kernel_op import kernel_op
from ..triton_math import gelu as _gelu, gelu_grad as _gelu_grad
from ..triton_launch import fast_launch
from ..triton_support import cdiv, check_launch, next_power_of_2, tl, triton

__all__ = ["channel_attention_triton"]

_BLOCK_B = 16  # images per program of the forward and the input gradient (tl.dot's smallest block)
_WEIGHTS_BLOCK_B = 32  # images per step of the weight-gradient sums
_BLOCK_C = 64  # channels per tile


if triton is not None:

    @fast_launch
    @triton.jit
    def _ca_fwd_kernel(p_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, a_ptr, h_ptr, batch, channels, hidden,
                       BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < batch
        j = tl.arange(0, BLOCK_H)
        j_ok = j < hidden
        h = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
        for start in range(0, channels, BLOCK_C):
            c = start + tl.arange(0, BLOCK_C)
            c_ok = c < channels
            p = tl.load(p_ptr + rows[:, None] * channels + c[None, :], mask=row_ok[:, None] & c_ok[None, :],
                        other=0.0).to(tl.float32)
            w1_t = tl.load(w1_ptr + j[None, :] * channels + c[:, None], mask=c_ok[:, None] & j_ok[None, :],
                           other=0.0).to(tl.float32)  # (C tile, H) of the (H, C) weight
            h += tl.dot(p, w1_t, input_precision="ieee")
        h += tl.load(b1_ptr + j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
        h_mask = row_ok[:, None] & j_ok[None, :]
        tl.store(h_ptr + rows[:, None] * hidden + j[None, :], h, mask=h_mask)
        g = tl.where(h_mask, _gelu(h), 0.0)
        for start in range(0, channels, BLOCK_C):
            c = start + tl.arange(0, BLOCK_C)
            c_ok = c < channels
            w2_t = tl.load(w2_ptr + c[None, :] * hidden + j[:, None], mask=j_ok[:, None] & c_ok[None, :],
                           other=0.0).to(tl.float32)  # (H, C tile) of the (C, H) weight
            z = tl.dot(g, w2_t, input_precision="ieee") + tl.load(b2_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
            a = 1.0 / (1.0 + tl.exp(-z))
            tl.store(a_ptr + rows[:, None] * channels + c[None, :], a.to(a_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & c_ok[None, :])

    @fast_launch
    @triton.jit
    def _ca_bwd_input_kernel(da_ptr, a_ptr, h_ptr, w1_ptr, w2_ptr, dz2_ptr, dz1_ptr, dp_ptr, batch, channels, hidden,
                             BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
        """The gradients of fc2's output (dz2), of fc1's output (dz1), both kept in float32 for the
        weight gradients, and of p."""
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < batch
        j = tl.arange(0, BLOCK_H)
        j_ok = j < hidden
        dg = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
        for start in range(0, channels, BLOCK_C):
            c = start + tl.arange(0, BLOCK_C)
            c_ok = c < channels
            mask = row_ok[:, None] & c_ok[None, :]
            offs = rows[:, None] * channels + c[None, :]
            da = tl.load(da_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dz2 = da * a * (1.0 - a)
            tl.store(dz2_ptr + offs, dz2, mask=mask)
            w2 = tl.load(w2_ptr + c[:, None] * hidden + j[None, :], mask=c_ok[:, None] & j_ok[None, :],
                         other=0.0).to(tl.float32)  # (C tile, H)
            dg += tl.dot(dz2, w2, input_precision="ieee")
        h_mask = row_ok[:, None] & j_ok[None, :]
        h = tl.load(h_ptr + rows[:, None] * hidden + j[None, :], mask=h_mask, other=0.0)
        dz1 = tl.where(h_mask, dg * _gelu_grad(h), 0.0)
        tl.store(dz1_ptr + rows[:, None] * hidden + j[None, :], dz1, mask=h_mask)
        for start in range(0, channels, BLOCK_C):
            c = start + tl.arange(0, BLOCK_C)
            c_ok = c < channels
            w1 = tl.load(w1_ptr + j[:, None] * channels + c[None, :], mask=j_ok[:, None] & c_ok[None, :],
                         other=0.0).to(tl.float32)  # (H, C tile)
            dp = tl.dot(dz1, w1, input_precision="ieee")
            tl.store(dp_ptr + rows[:, None] * channels + c[None, :], dp.to(dp_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & c_ok[None, :])

    @fast_launch
    @triton.jit
    def _ca_bwd_weights_kernel(dz2_ptr, dz1_ptr, h_ptr, p_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,
                               batch, channels, hidden,
                               BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
        """For one block of channels: fc2's weight rows and bias entries, fc1's weight columns, summed
        over all images; fc1's bias by the first program."""
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < channels
        j = tl.arange(0, BLOCK_H)
        j_ok = j < hidden
        dw2 = tl.zeros([BLOCK_C, BLOCK_H], dtype=tl.float32)
        dw1 = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
        db2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        db1 = tl.zeros([BLOCK_H], dtype=tl.float32)
        for start in range(0, batch, BLOCK_B):
            rows = start + tl.arange(0, BLOCK_B)
            row_ok = rows < batch
            c_mask = row_ok[:, None] & c_ok[None, :]
            h_mask = row_ok[:, None] & j_ok[None, :]
            dz2 = tl.load(dz2_ptr + rows[:, None] * channels + c[None, :], mask=c_mask, other=0.0)
            p = tl.load(p_ptr + rows[:, None] * channels + c[None, :], mask=c_mask, other=0.0).to(tl.float32)
            h = tl.load(h_ptr + rows[:, None] * hidden + j[None, :], mask=h_mask, other=0.0)
            g = tl.where(h_mask, _gelu(h), 0.0)
            dz1 = tl.load(dz1_ptr + rows[:, None] * hidden + j[None, :], mask=h_mask, other=0.0)
            dw2 += tl.dot(tl.trans(dz2), g, input_precision="ieee")
            dw1 += tl.dot(tl.trans(dz1), p, input_precision="ieee")
            db2 += tl.sum(dz2, axis=0)
            db1 += tl.sum(dz1, axis=0)
        tl.store(dw2_ptr + c[:, None] * hidden + j[None, :], dw2.to(dw2_ptr.dtype.element_ty),
                 mask=c_ok[:, None] & j_ok[None, :])
        tl.store(dw1_ptr + j[:, None] * channels + c[None, :], dw1.to(dw1_ptr.dtype.element_ty),
                 mask=j_ok[:, None] & c_ok[None, :])
        tl.store(db2_ptr + c, db2.to(db2_ptr.dtype.element_ty), mask=c_ok)
        if tl.program_id(0) == 0:
            tl.store(db1_ptr + j, db1.to(db1_ptr.dtype.element_ty), mask=j_ok)


def _block_h(hidden: int) -> int:
    return max(16, next_power_of_2(hidden))


def _forward(pooled: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor, fc2_weight: torch.Tensor,
             fc2_bias: torch.Tensor, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(the attention (B, C) in ``out_dtype``, fc1's output (B, H) in float32)."""
    batch, channels = pooled.shape
    hidden = fc1_weight.shape[0]
    attention = torch.empty((batch, channels), dtype=out_dtype, device=pooled.device)
    h = torch.empty((batch, hidden), dtype=torch.float32, device=pooled.device)
    _ca_fwd_kernel[(cdiv(batch, _BLOCK_B),)](pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, attention, h,
                                                    batch, channels, hidden, BLOCK_B=_BLOCK_B, BLOCK_C=_BLOCK_C,
                                                    BLOCK_H=_block_h(hidden), num_warps=4)
    return attention, h


def _forward_fake(pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, out_dtype):
    return (pooled.new_empty(pooled.shape, dtype=out_dtype),
            pooled.new_empty((pooled.shape[0], fc1_weight.shape[0]), dtype=torch.float32))


def _gradients(grad: torch.Tensor, pooled: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor,
               fc2_weight: torch.Tensor, fc2_bias: torch.Tensor, attention: torch.Tensor,
               h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of pooled, fc1's weight and bias, fc2's weight and bias, each in its input's dtype."""
    batch, channels = pooled.shape
    hidden = fc1_weight.shape[0]
    scratch = torch.empty(batch * (channels + hidden), dtype=torch.float32, device=pooled.device)
    dz2, dz1 = scratch[:batch * channels].view(batch, channels), scratch[batch * channels:].view(batch, hidden)
    grad_pooled = torch.empty_like(pooled)
    block_h = _block_h(hidden)
    _ca_bwd_input_kernel[(cdiv(batch, _BLOCK_B),)](grad, attention, h, fc1_weight, fc2_weight, dz2, dz1,
                                                          grad_pooled, batch, channels, hidden, BLOCK_B=_BLOCK_B,
                                                          BLOCK_C=_BLOCK_C, BLOCK_H=block_h, num_warps=4)
    grads = [torch.empty_like(t) for t in (fc1_weight, fc1_bias, fc2_weight, fc2_bias)]
    _ca_bwd_weights_kernel[(cdiv(channels, _BLOCK_C),)](dz2, dz1, h, pooled, *grads, batch, channels, hidden,
                                                               BLOCK_B=_WEIGHTS_BLOCK_B, BLOCK_C=_BLOCK_C,
                                                               BLOCK_H=block_h, num_warps=4)
    return grad_pooled, *grads


def _gradients_fake(grad, pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, attention, h):
    return tuple(torch.empty_like(t) for t in (pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias))


def _setup_context(ctx, inputs, output) -> None:
    pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, _out_dtype = inputs
    attention, h = output
    ctx.save_for_backward(pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, attention, h)
    ctx.mark_non_differentiable(h)


def _backward(ctx, gradients, grad: Optional[torch.Tensor], _grad_h):
    if grad is None:  # the attention was not used in the loss
        return (None,) * 6
    return (*gradients(grad.contiguous(), *ctx.saved_tensors), None)


_attention = kernel_op("channel_attention", _forward, _forward_fake, setup_context=_setup_context,
                       backward=_backward, backward_impl=_gradients, backward_fake=_gradients_fake)


def channel_attention_triton(pooled: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor,
                             fc2_weight: torch.Tensor, fc2_bias: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """sigmoid(fc2(GELU(fc1(pooled)))) for a (B, C) ``pooled``, fc1 (H, C) and fc2 (C, H) with biases,
    computed in float32, the result in ``out_dtype``; any mix of float32/float16/bfloat16 inputs."""
    check_launch("channel attention", pooled)
    return _attention(pooled.contiguous(), fc1_weight.contiguous(), fc1_bias.contiguous(), fc2_weight.contiguous(),
                      fc2_bias.contiguous(), out_dtype)[0]
