"""The published DefMamba variants (Tiny, Small, Base) and how to recognise one from its weights.

A leaf module: the model definitions, the checkpoint loader and the timm registry all read the
variant table from here, so none of them has to import another to know the variants.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch

__all__ = ["VariantSpec", "VARIANTS", "architecture_of", "variant_of"]


@dataclass(frozen=True)
class VariantSpec:
    """Architecture of one published variant."""

    dims: int
    depths: tuple[int, ...]
    drop_path_rate: float


VARIANTS = {
    "tiny": VariantSpec(dims=48, depths=(2, 2, 5, 2), drop_path_rate=0.2),
    "small": VariantSpec(dims=96, depths=(2, 2, 6, 2), drop_path_rate=0.2),
    "base": VariantSpec(dims=96, depths=(2, 3, 16, 2), drop_path_rate=0.4),
}


def architecture_of(state: Mapping[str, torch.Tensor]) -> tuple[Optional[int], tuple[int, ...]]:
    """Base width and per-stage depths of a DefMamba state dict, read from its parameter names.

    The width is the output channels of the patch embedding's last convolution (None when the
    state dict has none); a stage's depth is its number of ``layers.{i}.blocks.{j}`` blocks.
    """
    width = state["patch_embed.5.weight"].shape[0] if "patch_embed.5.weight" in state else None
    depths = []
    for i in range(8):
        blocks = {k.split(".")[3] for k in state if k.startswith(f"layers.{i}.blocks.")}
        if not blocks:
            break
        depths.append(len(blocks))
    return width, tuple(depths)


def variant_of(state: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The name in :data:`VARIANTS` ('tiny', 'small', 'base') whose architecture the state dict has,
    or None for any other architecture."""
    width, depths = architecture_of(state)
    return next((name for name, spec in VARIANTS.items() if spec.dims == width and spec.depths == depths), None)
