"""Building blocks of DefMamba: patch embedding, downsampling, MLP and the DM block.

Everything after the patch embedding works channels-last, on (B, h, w, C) tensors. Module
indices inside the ``nn.Sequential`` stems match the official checkpoints' keys.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..ops.dispatch import runs_as_called
from ..ops.drop_path import add_dropped_path
from ..ops.gelu_mlp import gelu_mlp
from ..ops.layer_norm import LayerNorm, LayerNormGELU, residual_layer_norm
from .dssm import DSSM

__all__ = ["Permute", "PatchEmbed", "Downsample", "Mlp", "ResidualDropPath", "DMBlock", "DMBlockSequence"]


class Permute(nn.Module):
    """Permute the dimensions of a tensor (a parameter-free step inside the stems)."""

    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


def PatchEmbed(in_chans: int, embed_dim: int) -> nn.Sequential:
    """Stem (stride 4): conv3×3 s2 → LN → GELU → conv3×3 s2 → LN; (B, 3, H, W) → (B, H/4, W/4, C).

    The first LN and the GELU run as one kernel (the stem's maps are the model's largest); the
    GELU's place (index 4) holds an Identity so that the official keys keep their indices."""
    return nn.Sequential(
        nn.Conv2d(in_chans, embed_dim // 2, 3, stride=2, padding=1),
        Permute(0, 2, 3, 1),
        LayerNormGELU(embed_dim // 2, feeds_matmul=True),  # feeds the second conv only
        Permute(0, 3, 1, 2),
        nn.Identity(),
        nn.Conv2d(embed_dim // 2, embed_dim, 3, stride=2, padding=1),
        Permute(0, 2, 3, 1),
        LayerNorm(embed_dim),
    )


def Downsample(dim: int, out_dim: int) -> nn.Sequential:
    """Stage transition: conv3×3 s2 → LN, channels-last in and out."""
    return nn.Sequential(
        Permute(0, 3, 1, 2),
        nn.Conv2d(dim, out_dim, 3, stride=2, padding=1),
        Permute(0, 2, 3, 1),
        LayerNorm(out_dim),
    )


class Mlp(nn.Module):
    """fc1 → GELU → fc2 (the official block's channel MLP; its dropouts are 0 and omitted).

    In training only x and fc1's output are kept: GELU is recomputed in the backward, where the
    hidden layer's gradient is one kernel on CUDA (``ops/gelu_mlp/``)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)


class ResidualDropPath(nn.Module):
    """x + DropPath(branch): stochastic depth of a residual branch, the per-sample mask applied in
    the residual sum itself (``ops/drop_path/``: one kernel each way on CUDA).

    The mask is drawn as timm's ``DropPath`` draws it (Bernoulli(1 − p) per sample, divided by
    1 − p) and the sum is computed in the wider of the two dtypes, the branch times the mask
    included. Outside training, or with p = 0, it is the plain sum."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        keep_prob = self._keep_prob()
        return x + branch if keep_prob is None else add_dropped_path(x, branch, keep_prob)

    def add_and_norm(self, x: torch.Tensor, branch: torch.Tensor,
                     norm: LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s, norm(s))`` for s = ``self(x, branch)``, in one pass each way on the kernel route
        (``ops/layer_norm``'s residual_layer_norm)."""
        return residual_layer_norm(x, branch, norm, self._keep_prob())

    def _keep_prob(self) -> Optional[float]:
        """1 − p while training with p > 0; None where the branch is added as it is."""
        return 1.0 - self.drop_prob if self.training and self.drop_prob > 0.0 else None

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


# The parameters of a DM block that autocast casts to its dtype when they are used (linear layers,
# matmuls, the 1×1 offset conv), which a stage casts for all its blocks at once
# (autocast_parameters.py). Not fc1's bias: the MLP's backward sums its gradient in float32 and
# returns it in the bias's dtype, which must stay float32.
_AUTOCAST_PARAMETERS = (
    "op.in_proj.weight", "op.x_proj_weight", "op.dt_projs_weight", "op.out_proj.weight",
    "op.DS.conv_offset.ca.0.weight", "op.DS.conv_offset.ca.0.bias", "op.DS.conv_offset.ca.2.weight",
    "op.DS.conv_offset.ca.2.bias", "op.DS.conv_offset.conv2.weight",
    "mlp.fc1.weight", "mlp.fc2.weight", "mlp.fc2.bias",
)


class DMBlock(nn.Module):
    """Deformable Mamba block: x + DropPath(DSSM(LN(x))), then x + DropPath(MLP(LN(x)))."""

    AUTOCAST_PARAMETERS = _AUTOCAST_PARAMETERS
    # Without gradients fc1's bias joins them: F.linear under autocast would cast it the same way.
    INFERENCE_AUTOCAST_PARAMETERS = _AUTOCAST_PARAMETERS + ("mlp.fc1.bias",)

    def __init__(self, dim: int, deform_kernel_size: int, drop_path: float = 0.0, d_state: int = 16,
                 ssm_ratio: float = 1.0, mlp_ratio: float = 4.0, scan_backend: str = "auto") -> None:
        super().__init__()
        # Both norms feed only linear layers (in_proj, fc1): under autocast they emit the autocast dtype.
        self.norm = LayerNorm(dim, feeds_matmul=True)
        self.op = DSSM(dim, deform_kernel_size, d_state=d_state, ssm_ratio=ssm_ratio, scan_backend=scan_backend)
        self.drop_path = ResidualDropPath(drop_path)
        self.norm2 = LayerNorm(dim, feeds_matmul=True)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_chained(x)[0]

    def forward_chained(self, x: torch.Tensor, normed: Optional[torch.Tensor] = None,
                        next_norm: Optional[LayerNorm] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The block on x, with ``normed`` = ``self.norm(x)`` when the caller has it; with ``next_norm``
        (the next block's first norm) also ``next_norm`` of the output. Returns (output, that norm or
        None). Each residual sum and the norm that follows it run as one op (one kernel each way on
        CUDA, ``ops/layer_norm``'s residual_layer_norm)."""
        if normed is None:
            normed = self.norm(x)
        x, hidden = self.drop_path.add_and_norm(x, self.op(normed), self.norm2)
        branch = self.mlp(hidden)
        if next_norm is None:
            return self.drop_path(x, branch), None
        return self.drop_path.add_and_norm(x, branch, next_norm)


class DMBlockSequence(nn.Sequential):
    """A stage's DM blocks in order: an ``nn.Sequential`` (same state-dict keys and indexing) whose
    forward hands each block's output to the next together with the next block's first norm of it,
    computed in the same pass as the output's last residual sum (:meth:`DMBlock.forward_chained`).

    When a block has hooks or a compiled forward, or a global module hook is set, the blocks run one
    module call after the other instead, so that hooks see what they always saw (a norm with hooks
    is called as a module after the sum); the results are the same either way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = list(self._modules.values())
        if not all(isinstance(block, DMBlock) and not runs_as_called(block) for block in blocks):
            return super().forward(x)
        normed = None
        for i, block in enumerate(blocks):
            next_norm = blocks[i + 1].norm if i + 1 < len(blocks) else None
            x, normed = block.forward_chained(x, normed, next_norm)
        return x
