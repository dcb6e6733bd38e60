"""Elementwise functions shared by the Triton kernels of several ops (``None`` without Triton)."""
from __future__ import annotations

from .triton_support import tl, triton

__all__ = ["gelu", "gelu_grad"]

gelu = gelu_grad = None

if triton is not None:

    @triton.jit
    def gelu(y):
        """Exact (erf) GELU in float32, in the order of PyTorch's CUDA kernel."""
        return y * 0.5 * (1.0 + tl.math.erf(y * 0.7071067811865476))

    @triton.jit
    def gelu_grad(y):
        """d GELU(y) / dy = Φ(y) + y·φ(y)."""
        cdf = 0.5 * (1.0 + tl.math.erf(y * 0.7071067811865476))
        pdf = tl.exp(-0.5 * y * y) * 0.3989422804014327
        return cdf + y * pdf
