"""The DSSM's per-scan time-step projection Δ = W_k · dt: (K, D, R) × (B, K, R, L) → (B, K, D, L).

CUDA tensors of one float dtype run the Triton kernel (``triton.py``), anything else
``torch.matmul`` (``reference.py``). Under autocast the op follows torch.matmul's rule: both inputs
in the autocast dtype, the result in it too. Differentiable in both inputs.
"""
from __future__ import annotations

import torch

from ..dispatch import use_kernels
from .reference import project_time_steps_reference
from .triton import project_time_steps_triton

__all__ = ["project_time_steps"]


def project_time_steps(weight: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """``torch.matmul(weight, dt)`` for weight (K, D, R) and dt (B, K, R, L): the time steps (B, K, D, L)."""
    if weight.dim() != 3 or dt.dim() != 4 or dt.shape[1] != weight.shape[0] or dt.shape[2] != weight.shape[2]:
        raise ValueError(f"project_time_steps: weight must be (K, D, R) and dt (B, K, R, L); got {tuple(weight.shape)} "
                         f"and {tuple(dt.shape)}")
    device_type = dt.device.type
    if torch.is_autocast_enabled(device_type):  # torch.matmul's autocast rule, applied before the kernel
        dtype = torch.get_autocast_dtype(device_type)
        weight, dt = weight.to(dtype), dt.to(dtype)
    if use_kernels("time_step_projection", weight, dt) and weight.dtype == dt.dtype and weight.device == dt.device:
        return project_time_steps_triton(weight, dt)
    return project_time_steps_reference(weight, dt)
