"""The optimizer and its two parameter groups: weights with weight decay, the rest without."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["SSM_PARAM_NAMES", "split_decay", "build_optimizer"]

# Parameters of the selective scan and the deformable position bias that TRAIN.NO_DECAY_SSM_PARAMS
# also exempts (Ds is 1-D and exempt anyway).
SSM_PARAM_NAMES = ("A_logs", "Ds", "dt_projs_bias", "rpe_table")


def split_decay(model: nn.Module, no_decay_ssm_params: bool = False) -> tuple[list[str], list[str]]:
    """Names of the trainable parameters (with weight decay, without), in ``named_parameters`` order.

    The authors' rule: no decay for 1-D parameters (norm weights, biases, ``Ds``) and names ending in
    ``.bias``; every other parameter is decayed, the SSM's ``A_logs``, ``dt_projs_bias`` and the
    deformable ``rpe_table`` included. With ``no_decay_ssm_params`` the parameters named in
    ``SSM_PARAM_NAMES`` are exempt too.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim <= 1 or name.endswith(".bias")
        if no_decay_ssm_params and name.rsplit(".", 1)[-1] in SSM_PARAM_NAMES:
            exempt = True
        (no_decay if exempt else decay).append(name)
    return decay, no_decay


def build_optimizer(config, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW (fused on the GPU) or SGD with Nesterov momentum at learning rate ``lr`` (the schedule's
    peak, which timm's scheduler reads from the groups), over two groups: decayed weights and the rest."""
    decay, no_decay = split_decay(model, config.TRAIN.NO_DECAY_SSM_PARAMS)
    params = dict(model.named_parameters())
    groups = [{"params": [params[n] for n in decay], "weight_decay": config.TRAIN.WEIGHT_DECAY},
              {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]
    opt = config.TRAIN.OPTIMIZER
    if opt.NAME == "adamw":
        # On the GPU the fused AdamW updates every tensor in a few kernels (and reads the GradScaler's
        # inf check on the device); elsewhere torch picks its own implementation.
        # TRAIN.CUDA_GRAPHS records the update into a graph: the step counts then live on the GPU.
        fused = bool(params) and all(p.is_cuda for p in params.values())
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(opt.BETAS), eps=opt.EPS,
                                 fused=fused or None, capturable=config.TRAIN.CUDA_GRAPHS)
    if opt.NAME == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=opt.MOMENTUM, nesterov=True)
    raise ValueError(f"unknown optimizer {opt.NAME!r}; use 'adamw' or 'sgd'")
