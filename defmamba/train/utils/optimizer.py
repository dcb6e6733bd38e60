"""Optimizer with weight decay on weights only."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["NO_DECAY_SUFFIXES", "split_decay", "build_optimizer"]

# Parameters of the selective scan and the deformable position bias are never decayed.
NO_DECAY_SUFFIXES = ("A_logs", "Ds", "dt_projs_bias", "rpe_table")


def split_decay(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of trainable parameters (with decay, without decay).

    No decay for 1-D parameters (norm weights, biases), names ending in ``.bias`` or one of
    ``NO_DECAY_SUFFIXES``, and names the model lists in ``no_weight_decay()``.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if (param.ndim <= 1 or name.endswith(".bias") or name in skip
                or any(name == s or name.endswith("." + s) for s in NO_DECAY_SUFFIXES)):
            no_decay.append(name)
        else:
            decay.append(name)
    return decay, no_decay


def build_optimizer(config, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (fused on the GPU) or SGD with Nesterov momentum, over two groups: decayed weights and the rest."""
    decay, no_decay = split_decay(model)
    params = dict(model.named_parameters())
    groups = [{"params": [params[n] for n in decay], "weight_decay": config.TRAIN.WEIGHT_DECAY},
              {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]
    opt = config.TRAIN.OPTIMIZER
    if opt.NAME == "adamw":
        # On the GPU the fused AdamW updates every tensor in a few kernels (and reads the GradScaler's
        # inf check on the device); elsewhere torch picks its own implementation.
        # TRAIN.CUDA_GRAPHS records the update into a graph: the step counts then live on the GPU.
        fused = bool(params) and all(p.is_cuda for p in params.values())
        return torch.optim.AdamW(groups, lr=config.TRAIN.BASE_LR, betas=tuple(opt.BETAS), eps=opt.EPS,
                                 fused=fused or None, capturable=config.TRAIN.CUDA_GRAPHS)
    if opt.NAME == "sgd":
        return torch.optim.SGD(groups, lr=config.TRAIN.BASE_LR, momentum=opt.MOMENTUM, nesterov=True)
    raise ValueError(f"unknown optimizer {opt.NAME!r}; use 'adamw' or 'sgd'")
