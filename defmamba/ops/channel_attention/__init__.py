"""The channel attention of the offset network: sigmoid(fc2(GELU(fc1(p)))) of the pooled maps.

``nn.Sequential(Linear(C, H), GELU(), Linear(H, C), Sigmoid())`` applied to a (B, C) input, with
the layers' weights and biases passed in. For CUDA tensors (float32/float16/bfloat16, any mix) it
runs as one Triton kernel forward and two backward (``triton.py``), where the plain ops launch 4
and 8 kernels; anywhere else, and for tracing and export, it runs the plain ops (``reference.py``).
The kernels compute in float32 and round only the result; under CUDA autocast the result is in
the autocast dtype, as the plain ops give it.
"""
from __future__ import annotations

import torch

from ..dispatch import use_kernels
from .reference import channel_attention_reference
from .triton import channel_attention_triton

__all__ = ["channel_attention"]


def channel_attention(pooled: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor,
                      fc2_weight: torch.Tensor, fc2_bias: torch.Tensor) -> torch.Tensor:
    """sigmoid(F.linear(F.gelu(F.linear(pooled, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)) for a
    (B, C) ``pooled``, fc1 (H, C) + (H,), fc2 (C, H) + (C,); the result (B, C) in the dtype the plain
    ops give (the autocast dtype under CUDA autocast, else the common dtype of the inputs)."""
    tensors = (pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    if pooled.dim() == 2 and use_kernels("channel_attention", *tensors):
        channels, hidden = pooled.shape[1], fc1_weight.shape[0]
        if (fc1_weight.shape != (hidden, channels) or fc1_bias.shape != (hidden,)
                or fc2_weight.shape != (channels, hidden) or fc2_bias.shape != (channels,)):
            raise ValueError(f"channel_attention: for pooled maps of {channels} channels the layers must be "
                             f"fc1 ({hidden}, {channels}) + ({hidden},) and fc2 ({channels}, {hidden}) + ({channels},); "
                             f"got {tuple(fc1_weight.shape)} + {tuple(fc1_bias.shape)} and "
                             f"{tuple(fc2_weight.shape)} + {tuple(fc2_bias.shape)}")
        if torch.is_autocast_enabled("cuda"):
            return channel_attention_triton(*tensors, torch.get_autocast_dtype("cuda"))
        if all(t.dtype == pooled.dtype for t in tensors):
            return channel_attention_triton(*tensors, pooled.dtype)
    return channel_attention_reference(*tensors)  # mixed dtypes outside autocast: PyTorch's error
