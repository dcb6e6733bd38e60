"""Depthwise K×K convolution (stride 1, "same" padding) with Triton kernels for channels-last CUDA maps.

DefMamba runs two depthwise convolutions per block on channels-last maps: the DSSM's 3×3 and the
offset network's K×K (9, 7, 5, 3 by stage). cuDNN's kernels for the large ones are slow (the
stage-1 9×9 took ~5 ms forward and ~9 ms backward per call at batch 128 in half precision);
``depthwise_conv_triton.py`` computes the same convolution close to the memory traffic it needs.

:class:`DepthwiseConv2d` is an ``nn.Conv2d`` (same parameters and state-dict keys, same result);
channels-last CUDA inputs in float32/float16/bfloat16 run the Triton kernels, anything else
``F.conv2d``. Under autocast it follows autocast's rule for convolutions: the input and parameters
in the autocast dtype (products exact in float32, accumulated in float32), the output in that dtype.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import depthwise_conv_triton as _triton
from . import triton_support

__all__ = ["DepthwiseConv2d", "cudnn_formulation", "depthwise_conv2d"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_force_cudnn = False


@contextlib.contextmanager
def cudnn_formulation() -> Iterator[None]:
    """Use ``F.conv2d`` (cuDNN) even for channels-last CUDA inputs inside this block (A/B
    measurements, debugging)."""
    global _force_cudnn
    previous, _force_cudnn = _force_cudnn, True
    try:
        yield
    finally:
        _force_cudnn = previous


def _check_shapes(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 4 or weight.shape[1] != 1 or weight.shape[2] != weight.shape[3] or weight.shape[2] % 2 == 0:
        raise ValueError(f"depthwise_conv2d: the weight must be (channels, 1, K, K) with K odd; got {tuple(weight.shape)}")
    if x.dim() != 4 or x.shape[1] != weight.shape[0]:
        raise ValueError(f"depthwise_conv2d: x must be (batch, {weight.shape[0]}, height, width) for a weight of "
                         f"{weight.shape[0]} channels; got {tuple(x.shape)}")


def _use_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    same_device = weight.device == x.device and (bias is None or bias.device == x.device)
    return (not _force_cudnn and x.is_cuda and same_device and x.dtype in _FLOATS and x.numel() > 0
            and _triton.pixel_stride(x) is not None and triton_support.ready())


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=K // 2, groups=C)`` for x (B, C, H, W) and a (C, 1, K, K)
    weight with K odd; through the Triton kernels for channels-last CUDA inputs (also the channel
    slice of a wider channels-last tensor, read in place)."""
    _check_shapes(x, weight)
    if _use_triton(x, weight, bias):
        if torch.is_autocast_enabled("cuda"):
            dtype = torch.get_autocast_dtype("cuda")
            return _triton.depthwise_conv2d_triton(x.to(dtype), weight, bias, dtype)
        if weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype):
            return _triton.depthwise_conv2d_triton(x, weight, bias, x.dtype)
        # Mixed dtypes outside autocast: F.conv2d names the mismatch (and that of mixed devices).
    return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=weight.shape[0])


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)``,
    computed by :func:`depthwise_conv2d`."""

    def __init__(self, channels: int, kernel_size: int, bias: bool = True) -> None:
        if kernel_size % 2 == 0:
            raise ValueError(f"DepthwiseConv2d needs an odd kernel size for 'same' padding; got {kernel_size}")
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depthwise_conv2d(x, self.weight, self.bias)
