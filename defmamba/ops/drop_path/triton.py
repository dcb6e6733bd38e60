"""Triton kernels of :func:`defmamba.ops.drop_path.add_dropped_path` (CUDA tensors).

x + branch · s[b], s[b] = kept[b] / keep_prob rounded to branch's dtype (as timm's DropPath divides
its mask), summed in float32 and written in the wider dtype of x and branch: one pass forward, where
the plain ops divide the mask and then add (two launches besides the draw); one pass backward, the
branch's gradient grad · s[b] in branch's dtype (the plain ops: two products and a cast). The
gradient of x is the incoming gradient itself.
"""
from __future__ import annotations

import struct
from typing import Optional

import torch

from ..kernel_op import kernel_op
from ..triton_launch import fast_launch
from ..triton_support import cdiv, check_launch, tl, triton

__all__ = ["add_dropped_path_triton", "inverse_keep_prob"]

_BLOCK = 2048  # values per program


if triton is not None:

    @triton.jit
    def _sample_scale(kept_ptr, offs, ok, per_sample, inv_keep):
        """s[b] of each value's sample b in float32, rounded to the mask's (branch's) dtype first."""
        kept = tl.load(kept_ptr + offs // per_sample, mask=ok, other=0.0).to(tl.float32)
        return (kept * inv_keep).to(kept_ptr.dtype.element_ty).to(tl.float32)

    @fast_launch
    @triton.jit
    def _add_dropped_path_kernel(x_ptr, branch_ptr, kept_ptr, out_ptr, numel, per_sample, inv_keep,
                                 BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < numel
        scale = _sample_scale(kept_ptr, offs, ok, per_sample, inv_keep)
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        branch = tl.load(branch_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, (x + branch * scale).to(out_ptr.dtype.element_ty), mask=ok)

    @fast_launch
    @triton.jit
    def _dropped_path_grad_kernel(grad_ptr, kept_ptr, grad_branch_ptr, numel, per_sample, inv_keep,
                                  BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < numel
        scale = _sample_scale(kept_ptr, offs, ok, per_sample, inv_keep)
        grad = tl.load(grad_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(grad_branch_ptr + offs, (grad * scale).to(grad_branch_ptr.dtype.element_ty), mask=ok)


def _float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def inverse_keep_prob(keep_prob: float) -> float:
    """1 / keep_prob as float32 arithmetic gives it (the division of a float32 mask by the float32
    scalar): kept · this is then exactly the mask's division, for kept in {0, 1}."""
    return _float32(1.0 / _float32(keep_prob))


def _forward(x: torch.Tensor, branch: torch.Tensor, kept: torch.Tensor, keep_prob: float) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, branch.dtype), device=x.device)
    numel = x.numel()
    _add_dropped_path_kernel[(cdiv(numel, _BLOCK),)](x, branch, kept, out, numel, numel // x.shape[0],
                                                            inverse_keep_prob(keep_prob), BLOCK=_BLOCK, num_warps=4)
    return out


def _forward_fake(x, branch, kept, keep_prob):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, branch.dtype))


def _branch_gradient(grad: torch.Tensor, kept: torch.Tensor, keep_prob: float,
                     branch_dtype: torch.dtype) -> torch.Tensor:
    grad_branch = torch.empty(grad.shape, dtype=branch_dtype, device=grad.device)
    numel = grad.numel()
    _dropped_path_grad_kernel[(cdiv(numel, _BLOCK),)](grad, kept, grad_branch, numel, numel // grad.shape[0],
                                                             inverse_keep_prob(keep_prob), BLOCK=_BLOCK, num_warps=4)
    return grad_branch


def _branch_gradient_fake(grad, kept, keep_prob, branch_dtype):
    return grad.new_empty(grad.shape, dtype=branch_dtype)


def _setup_context(ctx, inputs, output) -> None:
    _x, branch, kept, keep_prob = inputs
    ctx.save_for_backward(kept)
    ctx.keep_prob = keep_prob
    ctx.branch_dtype = branch.dtype


def _backward(ctx, branch_gradient, grad: Optional[torch.Tensor]):
    if grad is None:
        return None, None, None, None
    (kept,) = ctx.saved_tensors
    return grad, branch_gradient(grad.contiguous(), kept, ctx.keep_prob, ctx.branch_dtype), None, None


_add = kernel_op("add_dropped_path", _forward, _forward_fake, setup_context=_setup_context, backward=_backward,
                 backward_impl=_branch_gradient, backward_fake=_branch_gradient_fake)


def add_dropped_path_triton(x: torch.Tensor, branch: torch.Tensor, kept: torch.Tensor, keep_prob: float) -> torch.Tensor:
    """The Triton route of :func:`defmamba.ops.drop_path.add_dropped_path`: contiguous x and branch of
    one shape, ``kept`` (B,) in branch's dtype."""
    check_launch("drop path", x)
    if not (x.is_contiguous() and branch.is_contiguous() and x.shape == branch.shape):
        raise ValueError("the Triton drop path takes contiguous x and branch of one shape")
    return _add(x, branch, kept.contiguous(), float(keep_prob))
