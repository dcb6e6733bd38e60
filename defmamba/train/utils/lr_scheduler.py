"""Per-iteration learning-rate schedule: linear warm-up, then cosine or step decay.

The learning rate is a pure function of the optimizer-step index, so a resumed run that starts
at step ``epoch * steps_per_epoch`` continues the schedule exactly.
"""
from __future__ import annotations

import math

import torch

__all__ = ["LRScheduler", "build_scheduler"]


class LRScheduler:
    """Sets ``lr`` of every parameter group of ``optimizer`` from the global step index."""

    def __init__(self, optimizer: torch.optim.Optimizer, name: str, base_lr: float, warmup_lr: float,
                 min_lr: float, total_steps: int, warmup_steps: int, decay_steps: int = 1,
                 decay_rate: float = 0.1) -> None:
        if name not in ("cosine", "step"):
            raise ValueError(f"unknown learning-rate schedule {name!r}; use 'cosine' or 'step'")
        self.optimizer = optimizer
        self.name = name
        self.base_lr, self.warmup_lr, self.min_lr = base_lr, warmup_lr, min_lr
        self.total_steps = max(1, total_steps)
        self.warmup_steps = warmup_steps
        self.decay_steps = max(1, decay_steps)
        self.decay_rate = decay_rate
        self.last_step = 0
        self.step_update(0)

    def lr_at(self, step: int) -> float:
        """The learning rate for optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.warmup_lr + (self.base_lr - self.warmup_lr) * step / self.warmup_steps
        if self.name == "step":
            return self.base_lr * self.decay_rate ** (step // self.decay_steps)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def step_update(self, step: int) -> None:
        """Apply the learning rate of optimizer step ``step`` to every parameter group."""
        self.last_step = step
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def state_dict(self) -> dict:
        return {"name": self.name, "last_step": self.last_step, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state: dict) -> None:
        self.step_update(int(state["last_step"]))


def build_scheduler(config, optimizer: torch.optim.Optimizer, steps_per_epoch: int, lr_scale: float) -> LRScheduler:
    """The schedule of ``config.TRAIN`` with every learning rate multiplied by ``lr_scale``
    (global batch / 512)."""
    train = config.TRAIN
    return LRScheduler(
        optimizer, name=train.LR_SCHEDULER.NAME, base_lr=train.BASE_LR * lr_scale,
        warmup_lr=train.WARMUP_LR * lr_scale, min_lr=train.MIN_LR * lr_scale,
        total_steps=train.EPOCHS * steps_per_epoch, warmup_steps=train.WARMUP_EPOCHS * steps_per_epoch,
        decay_steps=train.LR_SCHEDULER.DECAY_EPOCHS * steps_per_epoch, decay_rate=train.LR_SCHEDULER.DECAY_RATE)
