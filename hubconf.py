"""torch.hub entry points: ``torch.hub.load("<owner>/DefMamba", "defmamba_small")``.

Each entry builds a published variant through :func:`defmamba.build_model`. ``pretrained=True``
loads weights from ``weights``, a local .pth or .safetensors file (the official checkpoints are on
Google Drive, which cannot be downloaded programmatically: see docs/pretrained.md). Building never
touches the network.
"""
from typing import Any, Optional

from torch import nn

import defmamba
from defmamba.checkpoint import CheckpointError
from defmamba.models.registry import OFFICIAL_CHECKPOINTS

dependencies = ["torch", "timm", "numpy", "safetensors"]


def _build(name: str, pretrained: bool, weights: Optional[str], kwargs: dict[str, Any]) -> nn.Module:
    if weights is not None and not pretrained:
        raise ValueError(f"{name}: weights={weights!r} is only read with pretrained=True")
    if pretrained and weights is None:
        raise CheckpointError(
            f"{name}: pass the weights file, e.g. torch.hub.load(..., '{name}', pretrained=True, "
            f"weights='/path/to/{name}.pth'); the official weights are on Google Drive "
            f"({OFFICIAL_CHECKPOINTS[name]}) and cannot be downloaded automatically")
    if weights is not None:
        kwargs = dict(kwargs, pretrained_cfg_overlay=dict(file=str(weights)))
    return defmamba.build_model(name, pretrained=pretrained, **kwargs)


def defmamba_tiny(pretrained: bool = False, weights: Optional[str] = None, **kwargs: Any) -> nn.Module:
    """DefMamba-T; ``kwargs`` (num_classes, drop_path_rate, ...) as for :func:`defmamba.build_model`."""
    return _build("defmamba_tiny", pretrained, weights, kwargs)


def defmamba_small(pretrained: bool = False, weights: Optional[str] = None, **kwargs: Any) -> nn.Module:
    """DefMamba-S; ``kwargs`` (num_classes, drop_path_rate, ...) as for :func:`defmamba.build_model`."""
    return _build("defmamba_small", pretrained, weights, kwargs)


def defmamba_base(pretrained: bool = False, weights: Optional[str] = None, **kwargs: Any) -> nn.Module:
    """DefMamba-B; ``kwargs`` (num_classes, drop_path_rate, ...) as for :func:`defmamba.build_model`."""
    return _build("defmamba_base", pretrained, weights, kwargs)
