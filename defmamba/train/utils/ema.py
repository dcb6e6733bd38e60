"""Exponential moving average of model weights."""
from __future__ import annotations

import copy
import weakref

import torch
from torch import nn

__all__ = ["ModelEma"]


def _state_slots(module: nn.Module) -> list[tuple[str, dict, str]]:
    """Where each state_dict entry of ``module`` lives: (qualified name, owning dict, key).

    The tensors are looked up in the owning dicts at every update, so moving the model with
    ``.to()`` (which replaces buffer objects) or reassigning a parameter is always seen. A tensor
    shared by several modules is listed once.
    """
    slots, seen = [], set()
    for prefix, sub in module.named_modules():
        owned = [(sub._parameters, key) for key in sub._parameters]
        owned += [(sub._buffers, key) for key in sub._buffers if key not in sub._non_persistent_buffers_set]
        for table, key in owned:
            tensor = table[key]
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            slots.append((f"{prefix}.{key}" if prefix else key, table, key))
    return slots


class ModelEma:
    """Keeps ``ema = decay * ema + (1 - decay) * model`` for floating tensors; copies the others.

    ``state_dict()`` has the model's keys, so it loads into a bare model (the ``model_ema`` entry
    of a checkpoint). An update is one multi-tensor ``lerp`` over every floating tensor (plus one
    copy for integer buffers), not two kernels per tensor: a few launches per training step.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._ema_slots = _state_slots(self.module)
        self._model_slots: list[tuple[str, dict, str]] = []
        self._model_ref = None

    def _pairs(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._model_ref is None or self._model_ref() is not model:
            slots = _state_slots(model)
            names, ema_names = [s[0] for s in slots], [s[0] for s in self._ema_slots]
            if names != ema_names:
                missing, extra = sorted(set(ema_names) - set(names)), sorted(set(names) - set(ema_names))
                raise ValueError(f"the model's tensors do not match the EMA copy's (missing {missing[:5]}, "
                                 f"unexpected {extra[:5]}); build ModelEma from this model")
            self._model_slots, self._model_ref = slots, weakref.ref(model)
        return [(ema_table[ema_key], table[key])
                for (_, ema_table, ema_key), (_, table, key) in zip(self._ema_slots, self._model_slots)]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        averaged, targets, copied, sources = [], [], [], []
        for ema_value, value in self._pairs(model):
            value = value.detach().to(device=ema_value.device, dtype=ema_value.dtype)
            if ema_value.is_floating_point():
                averaged.append(ema_value)
                targets.append(value)
            else:
                copied.append(ema_value)
                sources.append(value)
        if averaged:
            torch._foreach_lerp_(averaged, targets, 1.0 - self.decay)
        if copied:
            torch._foreach_copy_(copied, sources)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict, strict: bool = True):
        return self.module.load_state_dict(state, strict=strict)
