"""DefMamba: Deformable Visual State Space Model (Liu et al., CVPR 2025).

A 4-stage hierarchical backbone of Deformable Mamba (DM) blocks. ``DefMamba`` is the ImageNet
classifier, ``DefMambaBackbone`` returns the normalised stage outputs for dense prediction.
Parameter names match the official checkpoints, which load with ``strict=True``.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..graphed_training import GraphedTraining
from ..ops.layer_norm import LayerNorm
from .autocast_parameters import ParameterCastGroup
from .blocks import DMBlock, DMBlockSequence, Downsample, PatchEmbed

__all__ = ["DefMamba", "DefMambaBackbone", "DEFORM_KERNEL_SIZES", "MIN_INPUT_SIZE"]

DEFORM_KERNEL_SIZES = (9, 7, 5, 3)  # offset-network kernel of each stage
MIN_INPUT_SIZE = 32


class Stage(nn.Module):
    """``depth`` DM blocks at one width, then an optional downsample to the next width."""

    def __init__(self, dim: int, depth: int, deform_kernel_size: int, drop_paths: Sequence[float],
                 out_dim: Optional[int], **block_kwargs) -> None:
        super().__init__()
        self.blocks = DMBlockSequence(*[
            DMBlock(dim, deform_kernel_size, drop_path=drop_paths[i], **block_kwargs) for i in range(depth)])
        self.downsample = Downsample(dim, out_dim) if out_dim is not None else nn.Identity()
        self.grad_checkpointing = False
        self._autocast_group = ParameterCastGroup(
            self.blocks, [f"{i}.{name}" for i in range(depth) for name in DMBlock.AUTOCAST_PARAMETERS])
        self._inference_autocast_group = ParameterCastGroup(
            self.blocks, [f"{i}.{name}" for i in range(depth) for name in DMBlock.INFERENCE_AUTOCAST_PARAMETERS])

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            # the recomputation must record the forward's operations, autocast's casts included
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
            return x
        # under autocast, the blocks' matmul parameters cast in one go (autocast_parameters.py); a
        # replica of nn.DataParallel shares these attributes with the original but has its own blocks
        if self._autocast_group.root is not self.blocks or self._inference_autocast_group.root is not self.blocks:
            self._autocast_group = ParameterCastGroup(self.blocks, self._autocast_group.names)
            self._inference_autocast_group = ParameterCastGroup(self.blocks, self._inference_autocast_group.names)
        group = self._autocast_group if torch.is_grad_enabled() else self._inference_autocast_group
        return group.run(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.forward_blocks(x))


def _init_weights(module: nn.Module) -> None:
    """Official init: truncated-normal Linear weights (std 0.02) with zero bias; LayerNorm 1/0."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _stage_dims(dims: Union[int, Sequence[int]], num_stages: int) -> list[int]:
    if isinstance(dims, int):
        return [dims * 2 ** i for i in range(num_stages)]
    dims = list(dims)
    if len(dims) != num_stages:
        raise ValueError(f"dims has {len(dims)} entries but depths has {num_stages} stages; give one width per stage or a single int")
    return dims


class _DefMambaTrunk(nn.Module):
    """Patch embedding and the stages, shared by the classifier and the backbone."""

    def __init__(self, dims: Union[int, Sequence[int]] = 96, depths: Sequence[int] = (2, 2, 6, 2), in_chans: int = 3,
                 drop_path_rate: float = 0.2, d_state: int = 16, ssm_ratio: float = 1.0, mlp_ratio: float = 4.0,
                 deform_kernel_sizes: Sequence[int] = DEFORM_KERNEL_SIZES, use_checkpoint: bool = False,
                 scan_backend: str = "auto") -> None:
        super().__init__()
        depths = tuple(depths)
        if len(deform_kernel_sizes) != len(depths):
            raise ValueError(f"need one deformable kernel size per stage: got {len(deform_kernel_sizes)} for {len(depths)} stages")
        self.dims = _stage_dims(dims, len(depths))
        self.depths = depths
        self.num_features = self.dims[-1]
        self.patch_embed = PatchEmbed(in_chans, self.dims[0])
        drop_paths = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.layers.append(Stage(
                self.dims[i], depth, deform_kernel_sizes[i], drop_paths[start:start + depth],
                out_dim=self.dims[i + 1] if i + 1 < len(depths) else None,
                d_state=d_state, ssm_ratio=ssm_ratio, mlp_ratio=mlp_ratio, scan_backend=scan_backend))
        self.feature_info = [dict(num_chs=dim, reduction=4 * 2 ** i, module=f"layers.{i}") for i, dim in enumerate(self.dims)]
        self.set_grad_checkpointing(use_checkpoint)

    def _autocast_parameter_names(self) -> list[str]:
        """The matmul parameters outside the blocks, which :meth:`_with_cast_parameters` casts in one
        go under autocast: the stem's and the downsamples' convolutions."""
        names = [f"patch_embed.{i}.{leaf}" for i in (0, 5) for leaf in ("weight", "bias")]
        names += [f"layers.{i}.downsample.1.{leaf}" for i, stage in enumerate(self.layers)
                  if isinstance(stage.downsample, nn.Sequential) for leaf in ("weight", "bias")]
        return names

    def _with_cast_parameters(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` with :meth:`_autocast_parameter_names` cast in one multi-tensor copy under
        autocast (models/autocast_parameters.py; the blocks' own parameters are cast per stage).
        The group is built on first use and again after the model's layout changed (a new head, a
        replica of nn.DataParallel)."""
        if torch.compiler.is_compiling():  # a compiled model casts as autocast does
            return fn(*args)
        group = self.__dict__.get("_autocast_group")
        if group is None or group.root is not self:
            group = ParameterCastGroup(self, self._autocast_parameter_names())
            self.__dict__["_autocast_group"] = group
        return group.call(fn, *args)

    def _forget_cast_parameters(self) -> None:
        """Drop the group of :meth:`_with_cast_parameters` after the layers it names were replaced."""
        self.__dict__.pop("_autocast_group", None)

    def forward(self, x: torch.Tensor) -> Any:
        graphs = self.__dict__.get("_graphed_training")
        if graphs is not None and graphs.module is self:  # not a replica of nn.DataParallel's
            return graphs(x)
        return self._forward_eager(x)

    def _forward_eager(self, x: torch.Tensor) -> Any:
        return self._with_cast_parameters(self._forward_cast, x)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward instead of storing its activations."""
        if enable and self.__dict__.get("_graphed_training") is not None:
            raise ValueError("gradient checkpointing recomputes blocks in the backward, which graphed training cannot "
                             "record; call set_graphed_training(False) first")
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @property
    def graphed_training(self) -> bool:
        """Whether :meth:`set_graphed_training` is on."""
        return self.__dict__.get("_graphed_training") is not None

    @torch.jit.ignore
    def set_graphed_training(self, enable: bool = True, max_signatures: int = 2) -> None:
        """Replay the model's training forward and backward from CUDA graphs, one pair per input
        shape (up to ``max_signatures``), inside an eager loop: the loss, DDP, the GradScaler and
        the optimizer stay as they are. For fixed input sizes on a GPU; evaluation, CPU inputs and
        further shapes run eagerly (``defmamba/graphed_training.py``)."""
        if not enable:
            self.__dict__["_graphed_training"] = None
            return
        if any(stage.grad_checkpointing for stage in self.layers):
            raise ValueError("graphed training cannot record gradient checkpointing's recomputation; call "
                             "set_grad_checkpointing(False) first")
        self.__dict__["_graphed_training"] = GraphedTraining(self, self._forward_eager, max_signatures=max_signatures)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected a (B, C, H, W) image batch, got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"the image batch is empty (shape {tuple(x.shape)}); pass at least one image")
        if min(x.shape[-2:]) < MIN_INPUT_SIZE:
            raise ValueError(f"input is {x.shape[-2]}×{x.shape[-1]}; DefMamba needs H and W ≥ {MIN_INPUT_SIZE} "
                             "(4 stride-2 stages after a stride-4 stem); resize or pad the images")
        return self.patch_embed(x)


class DefMamba(_DefMambaTrunk):
    """DefMamba image classifier.

    Args:
        dims: width of stage 0 (doubled at each stage) or one width per stage.
        depths: number of DM blocks per stage.
        num_classes: classifier outputs (0 for no head).
        in_chans: input channels.
        drop_path_rate: stochastic depth rate, linearly increasing over all blocks.
        d_state: SSM state size N. ssm_ratio: inner width / stage width. mlp_ratio: MLP expansion.
        deform_kernel_sizes: offset-network kernel per stage.
        use_checkpoint: gradient checkpointing of every block.
        scan_backend: selective-scan backend ("auto", "cuda", "triton", "torch").
    """

    def __init__(self, dims: Union[int, Sequence[int]] = 96, depths: Sequence[int] = (2, 2, 6, 2), num_classes: int = 1000,
                 **kwargs) -> None:
        super().__init__(dims=dims, depths=depths, **kwargs)
        self.num_classes = num_classes
        self.classifier = nn.Module()
        self.classifier.norm = LayerNorm(self.num_features)
        self.classifier.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the head with a freshly initialised one of ``num_classes`` outputs (0: none)."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"DefMamba pools by averaging only; got global_pool={global_pool!r}")
        self.num_classes = num_classes
        self.classifier.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.classifier.head.apply(_init_weights)
        self._forget_cast_parameters()

    def _autocast_parameter_names(self) -> list[str]:
        """The trunk's, and the classifier's linear layer."""
        head = ["classifier.head.weight", "classifier.head.bias"] if isinstance(self.classifier.head, nn.Linear) else []
        return super()._autocast_parameter_names() + head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → channels-last (B, h, w, C) after the last stage."""
        x = self._embed(x)
        for stage in self.layers:
            x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """LayerNorm → global average pool → Linear; ``pre_logits`` stops before the Linear."""
        x = self.classifier.norm(x).mean(dim=(1, 2))
        return x if pre_logits else self.classifier.head(x)

    def _forward_cast(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, list[int]]] = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm feature API: stage outputs (before their downsample) as (B, C, h, w) maps."""
        from timm.models._features import feature_take_indices

        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.layers), indices)
        intermediates = []
        x = self._embed(x)
        last = max_index if (stop_early or intermediates_only) else len(self.layers) - 1
        for i, stage in enumerate(self.layers[:last + 1]):
            features = stage.forward_blocks(x)
            if i in take:
                intermediates.append(features.permute(0, 3, 1, 2) if output_fmt == "NCHW" else features)
            x = stage.downsample(features)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, list[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last needed one (and the head) for feature extraction."""
        from timm.models._features import feature_take_indices

        take, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[:max_index + 1]
        self._forget_cast_parameters()
        if prune_head:
            self.reset_classifier(0)
        if prune_norm:
            self.classifier.norm = nn.Identity()
        return take


class DefMambaBackbone(_DefMambaTrunk):
    """DefMamba for dense prediction: the outputs of the stages in ``out_indices``, each through its
    own LayerNorm ``outnorm{i}``, as channels-first (B, C_i, h_i, w_i) maps.

    Takes the trunk arguments of :class:`DefMamba` (``dims``, ``depths``, ``drop_path_rate``, …).
    With an empty ``out_indices`` the last stage's channels-last output is returned instead.
    """

    def __init__(self, dims: Union[int, Sequence[int]] = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 out_indices: Sequence[int] = (0, 1, 2, 3), drop_path_rate: float = 0.1, **kwargs) -> None:
        super().__init__(dims=dims, depths=depths, drop_path_rate=drop_path_rate, **kwargs)
        self.out_indices = tuple(out_indices)
        bad = [i for i in self.out_indices if not 0 <= i < len(self.layers)]
        if bad:
            raise ValueError(f"out_indices {bad} out of range for {len(self.layers)} stages")
        for i in self.out_indices:
            self.add_module(f"outnorm{i}", LayerNorm(self.dims[i]))
        self.apply(_init_weights)

    def _forward_cast(self, x: torch.Tensor) -> Union[list[torch.Tensor], torch.Tensor]:
        x = self._embed(x)
        outputs = []
        for i, stage in enumerate(self.layers):
            features = stage.forward_blocks(x)
            if i in self.out_indices:
                outputs.append(getattr(self, f"outnorm{i}")(features).permute(0, 3, 1, 2).contiguous())
            x = stage.downsample(features)
        return outputs if self.out_indices else x
