"""Shared by the tests that compare CUDA-graph training steps with eager ones."""
from __future__ import annotations

from typing import Iterable

import torch


def assert_trained_alike(reference: Iterable[tuple[str, torch.Tensor]], other: Iterable[torch.Tensor],
                         max_step_change: float) -> None:
    """Two runs of the same training steps end with the same tensors, up to atomic-order noise.

    Two runs are not bit-identical: the sampling backward adds float32 gradients with atomics, in
    whatever order they arrive. AdamW's normalised step turns that noise into differences of up to
    ~lr per step in the few parameters whose gradient is near zero, so 0.1 % of the entries may
    differ beyond rtol 1e-3 / atol 1e-4, and none by more than ``max_step_change`` (a few times the
    largest total update). A run that skipped or repeated an update would move every entry by ~lr.
    """
    mismatched = total = 0
    for (name, a), b in zip(reference, other):
        assert (b - a).abs().max().item() <= max_step_change, name
        mismatched += (~torch.isclose(b, a, rtol=1e-3, atol=1e-4)).sum().item()
        total += a.numel()
    assert mismatched <= 1e-3 * total, f"{mismatched} of {total} entries differ beyond rtol 1e-3, atol 1e-4"


def assert_trained_identically(reference: Iterable[tuple[str, torch.Tensor]], other: Iterable[torch.Tensor]) -> None:
    """Two runs of the same training steps end with the same tensors, bit for bit (on the CPU, where
    a replay of emulated graphs runs the eager operators in the eager order)."""
    for (name, a), b in zip(reference, other, strict=True):
        assert torch.equal(a, b), name


def run_steps(step, optimizer: torch.optim.Optimizer, batches, lrs) -> tuple[list[float], list[float]]:
    """Losses and gradient norms of one training ``step`` per (images, targets) batch, the
    optimizer's learning rate set to the next of ``lrs`` before each."""
    losses, norms = [], []
    for (images, targets), lr in zip(batches, lrs):
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, norm = step(images, targets)
        losses.append(loss.item())
        norms.append(norm.item())
    return losses, norms


def amp_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
             images: torch.Tensor, targets: torch.Tensor, amp_dtype, cache_enabled: bool = True) -> torch.Tensor:
    """One training step on the images' device: cross-entropy under autocast (float32 for
    ``amp_dtype`` None), the scaled backward, the optimizer step through the scaler, gradients set
    to None; the loss."""
    with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None,
                        cache_enabled=cache_enabled):
        loss = torch.nn.functional.cross_entropy(model(images), targets)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss
