"""Elementwise functions shared by the Triton kernels of several ops (``None`` without Triton)."""
from __future__ import annotations

from .triton_support import tl, triton

__all__ = ["divide_rn", "gelu", "gelu_grad", "one_plus_exp_neg", "silu"]

gelu = gelu_grad = one_plus_exp_neg = divide_rn = silu = None

if triton is not None:
    from triton.language.extra import libdevice

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

    @triton.jit
    def one_plus_exp_neg(z, INTERPRETED: tl.constexpr):
        """1 + exp(−z) in float32 (libdevice's exp on the GPU, as PyTorch's CUDA SiLU; the
        interpreter has no libdevice)."""
        if INTERPRETED:
            result = 1.0 + tl.exp(-z)
        else:
            result = 1.0 + libdevice.exp(-z)
        return result

    @triton.jit
    def divide_rn(x, y, INTERPRETED: tl.constexpr):
        """x / y correctly rounded on the GPU (Triton's plain float32 division is approximate)."""
        if INTERPRETED:
            result = x / y
        else:
            result = libdevice.div_rn(x, y)
        return result

    @triton.jit
    def silu(x, INTERPRETED: tl.constexpr):
        """SiLU of float32 x as PyTorch's CUDA kernel computes it: x / (1 + exp(−x)), rounding for rounding."""
        return divide_rn(x, one_plus_exp_neg(x, INTERPRETED), INTERPRETED)
