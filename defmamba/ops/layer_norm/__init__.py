"""LayerNorm over the last dim, a drop-in ``nn.LayerNorm``, and LayerNorm + GELU in one pass.

:class:`LayerNorm` has ``nn.LayerNorm``'s parameters and state-dict keys and computes the same
result. Contiguous CUDA inputs of float32/float16/bfloat16 with an elementwise affine run the
Triton kernels (``triton.py``), anything else ``F.layer_norm`` (``reference.py``). Under autocast it
follows autocast's rule for ``layer_norm``: float32 statistics and a float32 output, whatever the
input dtype (a half-precision input is read as it is, not copied to float32 first).
:func:`layer_norm_gelu` adds the exact GELU, and optionally a per-image channel scale of the input.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..dispatch import runs_as_called, use_kernels
from ..drop_path import add_with_mask, draw_kept
from .reference import layer_norm_reference
from .triton import MAX_COLUMNS, layer_norm_triton, residual_layer_norm_triton

__all__ = ["LayerNorm", "LayerNormGELU", "layer_norm", "layer_norm_gelu", "residual_layer_norm"]


def layer_norm(x: torch.Tensor, normalized_shape: tuple[int, ...], weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5,
               autocast_dtype_output: bool = False) -> torch.Tensor:
    """``F.layer_norm`` (same arguments), through the Triton kernels where they apply.

    Under CUDA autocast the output is float32, autocast's rule for layer_norm; with
    ``autocast_dtype_output`` the Triton kernels write it in the autocast dtype instead. For a
    norm whose output only enters matmuls, which autocast rounds to that dtype anyway, that is the
    same result without the float32 tensor and the cast (and their backward)."""
    return _normalize(x, tuple(normalized_shape), weight, bias, eps, autocast_dtype_output, gelu=False)


def layer_norm_gelu(x: torch.Tensor, norm: nn.LayerNorm, autocast_dtype_output: bool = False,
                    channel_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``F.gelu(norm(x))`` (exact GELU) in one pass through the Triton kernels where they apply.

    The GELU is computed in float32 on the normalised values, before the output is rounded, and
    its backward recomputes them: no float32 copy is kept for GELU's backward. Output dtype as for
    :func:`layer_norm` (``autocast_dtype_output`` when the result only enters matmuls).

    ``channel_scale`` s (B, C) for x (B, ..., C) normalises x · s[b] instead (a channel attention),
    the product formed as the kernels read x (in float32) rather than written out and read back."""
    if channel_scale is not None and (channel_scale.dim() != 2 or x.dim() < 2
                                      or channel_scale.shape != (x.shape[0], x.shape[-1])):
        raise ValueError(f"layer_norm_gelu: channel_scale must be (batch, channels) = ({x.shape[0]}, {x.shape[-1]}) "
                         f"for an input of shape {tuple(x.shape)}; got {tuple(channel_scale.shape)}")
    return _normalize(x, tuple(norm.normalized_shape), norm.weight, norm.bias, norm.eps, autocast_dtype_output,
                      gelu=True, channel_scale=channel_scale)


def _normalize(x: torch.Tensor, normalized_shape: tuple[int, ...], weight, bias, eps: float,
               autocast_dtype_output: bool, gelu: bool, channel_scale: torch.Tensor | None = None) -> torch.Tensor:
    if not (use_kernels("layer_norm", x) and len(normalized_shape) == 1 and normalized_shape[0] <= MAX_COLUMNS
            and x.is_contiguous() and weight is not None and bias is not None
            and (channel_scale is None or (channel_scale.dtype == x.dtype and channel_scale.device == x.device))):
        return layer_norm_reference(x, normalized_shape, weight, bias, eps, gelu, channel_scale)
    if tuple(x.shape[-1:]) != normalized_shape:
        raise ValueError(f"layer_norm: normalized_shape {normalized_shape} does not match the last dim of "
                         f"an input of shape {tuple(x.shape)}")
    if torch.is_autocast_enabled("cuda"):
        out_dtype = torch.get_autocast_dtype("cuda") if autocast_dtype_output else torch.float32
        return layer_norm_triton(x, weight.float(), bias.float(), eps, out_dtype, gelu, channel_scale)
    if weight.dtype != bias.dtype or weight.dtype not in (x.dtype, torch.float32):  # mixes as PyTorch handles them
        return layer_norm_reference(x, normalized_shape, weight, bias, eps, gelu, channel_scale)
    # PyTorch's rule: the output has x's dtype
    return layer_norm_triton(x, weight, bias, eps, x.dtype, gelu, channel_scale)


def residual_layer_norm(x: torch.Tensor, branch: torch.Tensor, norm: "LayerNorm",
                        keep_prob: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, norm(s))`` for the residual sum s = x + branch, or with stochastic depth (``keep_prob``)
    s = x + branch · kept[b] / keep_prob, the mask drawn as ``ops/drop_path`` draws it.

    On the kernel route (contiguous CUDA x and branch of one shape, an affine norm over the last
    dim) the sum and its norm are one kernel forward and one backward, which also adds the sum's
    gradient from elsewhere and forms the branch's: the same values as the sum and ``norm`` one after
    the other, in the norm's dtype rules (its ``feeds_matmul`` included). A norm with hooks (or a
    compiled forward) is called as a module instead, after the sum."""
    kept = draw_kept(branch, keep_prob) if keep_prob is not None else None
    weight, bias = norm.weight, norm.bias
    if (use_kernels("layer_norm", x, branch) and use_kernels("drop_path", x, branch) and not runs_as_called(norm)
            and x.shape == branch.shape
            and x.is_contiguous() and branch.is_contiguous() and weight is not None and bias is not None
            and len(norm.normalized_shape) == 1 and x.shape[-1] == norm.normalized_shape[0] <= MAX_COLUMNS):
        if torch.is_autocast_enabled("cuda"):
            out_dtype = torch.get_autocast_dtype("cuda") if getattr(norm, "feeds_matmul", False) else torch.float32
            return residual_layer_norm_triton(x, branch, kept, keep_prob or 1.0, weight.float(), bias.float(),
                                              norm.eps, out_dtype)
        out_dtype = torch.promote_types(x.dtype, branch.dtype)
        if weight.dtype == bias.dtype and weight.dtype in (out_dtype, torch.float32):
            return residual_layer_norm_triton(x, branch, kept, keep_prob or 1.0, weight, bias, norm.eps, out_dtype)
    total = add_with_mask(x, branch, kept, keep_prob) if kept is not None else x + branch
    return total, norm(total)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm``, computed by :func:`layer_norm`.

    ``feeds_matmul=True`` declares that the output only enters matmuls (linear or conv layers):
    under CUDA autocast it then comes out in the autocast dtype (see :func:`layer_norm`)."""

    def __init__(self, *args, feeds_matmul: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.feeds_matmul = feeds_matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps,
                          autocast_dtype_output=self.feeds_matmul)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", feeds_matmul=True" if self.feeds_matmul else "")


class LayerNormGELU(LayerNorm):
    """GELU(LayerNorm(x)) in one pass (:func:`layer_norm_gelu`); the parameters and state-dict keys
    of ``nn.LayerNorm``. ``feeds_matmul=True``: the output only enters linear or conv layers, so
    under CUDA autocast it comes out in the autocast dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm_gelu(x, self, autocast_dtype_output=self.feeds_matmul)
