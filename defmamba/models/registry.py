"""timm registration of DefMamba-T/S/B and the metadata of the official weights.

After ``import defmamba``, ``timm.create_model("defmamba_small", pretrained=True,
pretrained_cfg_overlay=dict(file="defmamba_small.pth"))`` builds the model and loads an official
checkpoint from a local file. The official weights are distributed through Google Drive, which
cannot be fetched programmatically, so ``pretrained=True`` needs a local file and never
touches the network.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg
from timm.models._features import FeatureGetterNet

from ..checkpoint import CheckpointError, extract_state_dict, load_state_dict_checked, safe_load
from ..variants import VARIANTS
from .defmamba import DefMamba

__all__ = ["build_model", "checkpoint_filter_fn", "OFFICIAL_RELEASE", "OFFICIAL_CHECKPOINTS"]

OFFICIAL_RELEASE = "https://github.com/leiyeliu/DefMamba"  # the authors' page listing the checkpoints
# The authors' ImageNet-1K checkpoints (Google Drive; download by hand, then pass the local file).
OFFICIAL_CHECKPOINTS = {
    "defmamba_tiny": "https://drive.google.com/file/d/1UkmsQpM93riFZGed-kgLKhNNl4gjDfuA/view",
    "defmamba_small": "https://drive.google.com/file/d/1zuVYW8KcL8kp3qwBCJv31jWJHzFyFshc/view",
    "defmamba_base": "https://drive.google.com/file/d/1DfPN87NZ5slt4a_THsXvUrUrl52rGpJ3/view",
}


def _cfg(variant: str, top1: float) -> dict[str, Any]:
    """Pretrained config of an official checkpoint: preprocessing, paper accuracy, weight location."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.0",
        "classifier": "classifier.head",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2504.05794",
        "paper_name": "DefMamba: Deformable Visual State Space Model",
        "origin_url": OFFICIAL_CHECKPOINTS[variant],
        "description": f"ImageNet-1K top-1 {top1}% (paper), official checkpoint from {OFFICIAL_RELEASE}",
        "notes": (f"top1={top1}", f"official_checkpoint={OFFICIAL_CHECKPOINTS[variant]}"),
    }


PAPER_TOP1 = {"defmamba_tiny": 78.6, "defmamba_small": 83.5, "defmamba_base": 84.2}  # ImageNet-1K, 224²

default_cfgs = generate_default_cfgs({
    f"{variant}.in1k": _cfg(variant, top1) for variant, top1 in PAPER_TOP1.items()})


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Official checkpoints need no key conversion; drop a head whose class count differs."""
    model_state = model.state_dict()
    return {k: v for k, v in state_dict.items()
            if not (k.startswith("classifier.head.") and (k not in model_state or model_state[k].shape != v.shape))}


def _pretrained_file(variant: str, overlay: Optional[dict]) -> str:
    """The local weights file named by the pretrained config; a clear error if there is none."""
    file = resolve_pretrained_cfg(variant, pretrained_cfg_overlay=overlay).to_dict().get("file")
    if not file:
        raise CheckpointError(
            f"{variant}: the official weights are on Google Drive ({OFFICIAL_CHECKPOINTS[variant]}) and cannot be downloaded "
            "automatically; download the .pth file and pass it with "
            f"timm.create_model('{variant}', pretrained=True, pretrained_cfg_overlay=dict(file='/path/to/{variant}.pth'))")
    if not Path(file).is_file():
        raise CheckpointError(f"{variant}: pretrained weights file not found: {file}")
    return file


def _load_pretrained(model: DefMamba, file: str) -> None:
    cfg = model.pretrained_cfg
    state, _ = extract_state_dict(safe_load(file))
    state = checkpoint_filter_fn(state, model)
    strict_head = model.num_classes == cfg.get("num_classes", 1000)
    load_state_dict_checked(model, state, strict=strict_head, source=f"pretrained weights {file}")


def _create_defmamba(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    spec = VARIANTS[variant.split("_", 1)[1]]
    features_only = kwargs.pop("features_only", False)
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    model_args = dict(dims=spec.dims, depths=spec.depths, drop_path_rate=spec.drop_path_rate)
    file = _pretrained_file(variant, kwargs.get("pretrained_cfg_overlay")) if pretrained else None  # fail before building
    model = build_model_with_cfg(DefMamba, variant, pretrained=False, **dict(model_args, **kwargs))
    if file is not None:
        _load_pretrained(model, file)
    if features_only:
        pretrained_cfg = model.pretrained_cfg
        model = FeatureGetterNet(model, out_indices=out_indices)
        model.pretrained_cfg = model.default_cfg = pretrained_cfg
    return model


@register_model
def defmamba_tiny(pretrained: bool = False, **kwargs: Any) -> DefMamba:
    """DefMamba-T: width 48, depths (2, 2, 5, 2), 7.5 M parameters, 1.29 GFLOPs at 224²."""
    return _create_defmamba("defmamba_tiny", pretrained, **kwargs)


@register_model
def defmamba_small(pretrained: bool = False, **kwargs: Any) -> DefMamba:
    """DefMamba-S: width 96, depths (2, 2, 6, 2), 30.2 M parameters, 5.01 GFLOPs at 224²."""
    return _create_defmamba("defmamba_small", pretrained, **kwargs)


@register_model
def defmamba_base(pretrained: bool = False, **kwargs: Any) -> DefMamba:
    """DefMamba-B: width 96, depths (2, 3, 16, 2), 48.6 M parameters, 8.93 GFLOPs at 224²."""
    return _create_defmamba("defmamba_base", pretrained, **kwargs)


def build_model(name: str = "defmamba_tiny", pretrained: bool = False, **overrides: Any) -> nn.Module:
    """Build a registered DefMamba variant ('defmamba_tiny' | 'defmamba_small' | 'defmamba_base').

    ``overrides`` replace architecture or head arguments (num_classes, drop_path_rate, dims,
    depths, use_checkpoint, scan_backend, ...).
    """
    factories = {"defmamba_tiny": defmamba_tiny, "defmamba_small": defmamba_small, "defmamba_base": defmamba_base}
    if name not in factories:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(factories)}")
    return factories[name](pretrained=pretrained, **overrides)
