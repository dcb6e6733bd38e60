"""Exponential moving average of model weights."""
from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["ModelEma"]


class ModelEma:
    """Keeps ``ema = decay * ema + (1 - decay) * model`` for floating tensors; copies the others.

    ``state_dict()`` has the model's keys, so it loads into a bare model (the ``model_ema`` entry
    of a checkpoint).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = model.state_dict()
        for key, ema_value in self.module.state_dict().items():
            value = current[key].detach()
            if ema_value.is_floating_point():
                ema_value.mul_(self.decay).add_(value.to(ema_value.dtype), alpha=1.0 - self.decay)
            else:
                ema_value.copy_(value)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict, strict: bool = True):
        return self.module.load_state_dict(state, strict=strict)
