"""Depthwise K×K convolution (stride 1, "same" padding, odd K) as a drop-in ``nn.Conv2d``.

:class:`DepthwiseConv2d` has ``nn.Conv2d``'s parameters and state-dict keys and computes the same
result. Channels-last CUDA inputs in float32/float16/bfloat16 (also the channel slice of a wider
channels-last tensor, read in place) run the Triton kernels (``triton.py``), anything else
``F.conv2d`` (``reference.py``). Under autocast it follows autocast's rule for convolutions: the
input and parameters in the autocast dtype (products exact in float32, accumulated in float32),
the output in that dtype. :func:`depthwise_conv2d_silu` is ``F.silu`` of it, the SiLU applied as the
kernel writes the output.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..dispatch import use_kernels
from .reference import depthwise_conv2d_reference
from .triton import depthwise_conv2d_triton, pixel_stride

__all__ = ["DepthwiseConv2d", "depthwise_conv2d", "depthwise_conv2d_silu"]


def _check_shapes(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 4 or weight.shape[1] != 1 or weight.shape[2] != weight.shape[3] or weight.shape[2] % 2 == 0:
        raise ValueError(f"depthwise_conv2d: the weight must be (channels, 1, K, K) with K odd; got {tuple(weight.shape)}")
    if x.dim() != 4 or x.shape[1] != weight.shape[0]:
        raise ValueError(f"depthwise_conv2d: x must be (batch, {weight.shape[0]}, height, width) for a weight of "
                         f"{weight.shape[0]} channels; got {tuple(x.shape)}")


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=K // 2, groups=C)`` for x (B, C, H, W) and a (C, 1, K, K)
    weight with K odd (module docstring for the routes)."""
    return _convolve(x, weight, bias, silu=False)


def depthwise_conv2d_silu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.silu(depthwise_conv2d(x, weight, bias))``; on the kernel route the SiLU is applied as the
    convolution is written (one pass instead of two), its backward as autograd's SiLU computes it."""
    return _convolve(x, weight, bias, silu=True)


def _convolve(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], silu: bool) -> torch.Tensor:
    _check_shapes(x, weight)
    if (use_kernels("depthwise_conv", x) and pixel_stride(x) is not None and weight.device == x.device
            and (bias is None or bias.device == x.device)):
        if torch.is_autocast_enabled("cuda"):
            dtype = torch.get_autocast_dtype("cuda")
            # x as it is when it already has the autocast dtype (the model's case): under
            # torch.compile a traced .to() of a strided slice can come out with symbolic strides,
            # which torch 2.11's Dynamo cannot unpack in pixel_stride.
            return depthwise_conv2d_triton(x if x.dtype == dtype else x.to(dtype), weight, bias, dtype, silu)
        if weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype):
            return depthwise_conv2d_triton(x, weight, bias, x.dtype, silu)
        # Mixed dtypes outside autocast: F.conv2d names the mismatch (and that of mixed devices).
    y = depthwise_conv2d_reference(x, weight, bias)
    return F.silu(y) if silu else y


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)``,
    computed by :func:`depthwise_conv2d`."""

    def __init__(self, channels: int, kernel_size: int, bias: bool = True) -> None:
        if kernel_size % 2 == 0:
            raise ValueError(f"DepthwiseConv2d needs an odd kernel size for 'same' padding; got {kernel_size}")
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depthwise_conv2d(x, self.weight, self.bias)
