"""Per-iteration learning-rate schedule: timm's schedulers with the arguments of the Swin/VMamba
family's ``build_scheduler``, and the linear scaling rule.

The learning rate is a function of the optimizer-step index alone (``step_update(t)``), so a
resumed run that starts at step ``epoch * steps_per_epoch`` continues the schedule exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.scheduler import CosineLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler

__all__ = ["REFERENCE_BATCH", "ScaledLearningRates", "scaled_learning_rates", "build_scheduler"]

REFERENCE_BATCH = 512  # TRAIN.BASE_LR, WARMUP_LR and MIN_LR are for this global batch


@dataclass(frozen=True)
class ScaledLearningRates:
    """Peak, warm-up start and final learning rates of one run."""
    base: float
    warmup: float
    min: float


def scaled_learning_rates(config, global_batch: int) -> ScaledLearningRates:
    """TRAIN.BASE_LR, WARMUP_LR and MIN_LR × ``global_batch`` / 512 (the linear scaling rule;
    ``global_batch`` = per-process batch × processes × accumulation steps)."""
    scale = global_batch / REFERENCE_BATCH
    train = config.TRAIN
    return ScaledLearningRates(base=train.BASE_LR * scale, warmup=train.WARMUP_LR * scale, min=train.MIN_LR * scale)


def build_scheduler(config, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                    lrs: ScaledLearningRates) -> Scheduler:
    """The schedule of ``config.TRAIN``, stepped per optimizer step with ``step_update(t)``.

    "cosine": linear warm-up from ``lrs.warmup`` to ``lrs.base`` over WARMUP_EPOCHS, then a cosine
    down to ``lrs.min`` at EPOCHS (one cycle, the warm-up as a prefix). "step": the same warm-up,
    then ×DECAY_RATE every DECAY_EPOCHS counted from step 0. The peak is the optimizer's learning
    rate, which must be ``lrs.base`` (``build_optimizer(config, model, lrs.base)``).
    """
    peaks = {group["lr"] for group in optimizer.param_groups}
    if peaks != {lrs.base}:
        raise ValueError(f"the optimizer's learning rate {sorted(peaks)} is not the scheduled peak {lrs.base}; "
                         "build the optimizer with lr=lrs.base")
    train = config.TRAIN
    warmup_steps = train.WARMUP_EPOCHS * steps_per_epoch
    if train.LR_SCHEDULER.NAME == "cosine":
        return CosineLRScheduler(
            optimizer, t_initial=max(1, train.EPOCHS * steps_per_epoch - warmup_steps), lr_min=lrs.min,
            warmup_lr_init=lrs.warmup, warmup_t=warmup_steps, cycle_limit=1, t_in_epochs=False, warmup_prefix=True)
    if train.LR_SCHEDULER.NAME == "step":
        return StepLRScheduler(
            optimizer, decay_t=train.LR_SCHEDULER.DECAY_EPOCHS * steps_per_epoch,
            decay_rate=train.LR_SCHEDULER.DECAY_RATE, warmup_lr_init=lrs.warmup, warmup_t=warmup_steps,
            warmup_prefix=False, t_in_epochs=False)
    raise ValueError(f"unknown learning-rate schedule {train.LR_SCHEDULER.NAME!r}; use 'cosine' or 'step'")
