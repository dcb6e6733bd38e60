"""The time-step projection in PyTorch: ``torch.matmul`` of (K, D, R) by (B, K, R, L). Any device
and dtype; the ground truth of the kernel."""
from __future__ import annotations

import torch

__all__ = ["project_time_steps_reference"]


def project_time_steps_reference(weight: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """``torch.matmul(weight, dt)``: (K, D, R) × (B, K, R, L) → (B, K, D, L)."""
    return torch.matmul(weight, dt)
