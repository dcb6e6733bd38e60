"""Stochastic depth on a residual branch: x + DropPath(branch) as one op.

The per-sample mask is drawn as timm's ``DropPath`` draws it (Bernoulli(keep_prob) per sample, in
the branch's dtype, divided by keep_prob in that dtype), and the sum is computed in the wider dtype
of x and branch. For contiguous CUDA tensors the division, product and sum run as one Triton
kernel, and the backward as one (``triton.py``); anywhere else as ``torch.addcmul`` (``reference.py``).
"""
from __future__ import annotations

import torch

from ..dispatch import use_kernels
from .reference import add_dropped_path_reference
from .triton import add_dropped_path_triton

__all__ = ["add_dropped_path", "add_with_mask", "draw_kept"]


def add_dropped_path(x: torch.Tensor, branch: torch.Tensor, keep_prob: float) -> torch.Tensor:
    """x + branch · mask[b], the mask Bernoulli(keep_prob) / keep_prob per sample b (first dim), drawn
    here from the default generator of branch's device; ``0 < keep_prob <= 1``."""
    return add_with_mask(x, branch, draw_kept(branch, keep_prob), keep_prob)


def draw_kept(branch: torch.Tensor, keep_prob: float) -> torch.Tensor:
    """The per-sample mask (B,) of 0s and 1s, Bernoulli(keep_prob), in branch's dtype and on its
    device, drawn as timm's DropPath draws it; ``0 < keep_prob <= 1``."""
    if not 0.0 < keep_prob <= 1.0:
        raise ValueError(f"add_dropped_path: keep_prob must be in (0, 1], got {keep_prob}")
    return branch.new_empty((branch.shape[0],)).bernoulli_(keep_prob)


def add_with_mask(x: torch.Tensor, branch: torch.Tensor, kept: torch.Tensor, keep_prob: float) -> torch.Tensor:
    """x + branch · kept[b] / keep_prob for a mask drawn by :func:`draw_kept`."""
    if (use_kernels("drop_path", x, branch) and x.shape == branch.shape and x.is_contiguous()
            and branch.is_contiguous()):
        return add_dropped_path_triton(x, branch, kept, keep_prob)
    return add_dropped_path_reference(x, branch, kept, keep_prob)
