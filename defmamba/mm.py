"""DefMamba as an mmdet / mmseg backbone.

Importing this module registers :class:`MM_DefMamba` in the ``MODELS`` registry of
every installed OpenMMLab task package (mmdet, mmseg). Configs reach it with
``custom_imports=dict(imports=['defmamba.mm'])`` and ``backbone=dict(type='MM_DefMamba', ...)``.

The wrapper is the library's :class:`~defmamba.DefMambaBackbone` itself (a subclass,
so its state-dict keys are the authors' backbone keys unchanged) plus what the
OpenMMLab runners expect: ``init_cfg``/``pretrained`` loading of classification
checkpoints with a report, ``frozen_stages`` and an ``init_weights`` method.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .checkpoint import CheckpointError, extract_state_dict, safe_load
from .models import DefMambaBackbone

__all__ = ["MM_DefMamba", "BackboneLoadReport", "load_backbone_weights"]

_REGISTRIES = []
try:
    from mmdet.registry import MODELS as _MMDET_MODELS

    _REGISTRIES.append(_MMDET_MODELS)
except ImportError:
    pass
try:
    from mmseg.registry import MODELS as _MMSEG_MODELS

    _REGISTRIES.append(_MMSEG_MODELS)
except ImportError:
    pass
if not _REGISTRIES:
    raise ImportError("defmamba.mm needs mmdet and/or mmsegmentation; install the optional "
                      "OpenMMLab stack with `bash tools/install_mm.sh` (or `make mm`)")

from mmengine.logging import HistoryBuffer, print_log  # noqa: E402  (mmengine comes with mmdet/mmseg)

_HISTORY_STATISTICS = ("min", "max", "current", "mean")


def _history_buffer_method(owner: Any, name: str) -> Any:
    """``getattr`` as mmengine checkpoints may use it, and no further.

    mmengine's ``HistoryBuffer`` pickles its statistics methods as ``getattr(HistoryBuffer, 'min')``,
    so every full training checkpoint (the ``message_hub`` entry) holds that call. Only those
    lookups are answered; anything else in a checkpoint asking for ``getattr`` is refused.
    """
    if owner is HistoryBuffer and name in _HISTORY_STATISTICS:
        return getattr(owner, name)
    raise pickle.UnpicklingError(f"checkpoint calls getattr({owner!r}, {name!r}); only mmengine HistoryBuffer "
                                 "statistics methods may be looked up (load a trusted file with allow_pickle=True)")


@contextlib.contextmanager
def mmengine_checkpoint_globals():
    """Let :func:`defmamba.checkpoint.safe_load` read mmengine's own checkpoints (see
    :func:`_history_buffer_method`)."""
    with torch.serialization.safe_globals([(_history_buffer_method, "builtins.getattr")]):
        yield


@dataclass
class BackboneLoadReport:
    """What :func:`load_backbone_weights` did.

    ``loaded``: backbone tensors taken from the checkpoint. ``kept_initialised``: backbone
    tensors the checkpoint does not carry (for a classification checkpoint, the ``outnorm{i}``
    LayerNorms, which only exist in the dense-prediction backbone). ``ignored``: checkpoint
    tensors the backbone has no use for (the classification head ``classifier.*`` and, for a
    detector/segmentor checkpoint, its neck and heads).
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    kept_initialised: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One paragraph for the training log."""
        lines = [f"DefMamba backbone weights from {self.source}: {len(self.loaded)} tensors loaded"]
        if self.kept_initialised:
            lines.append(f"  not in the checkpoint, kept as initialised ({len(self.kept_initialised)}): "
                         + ", ".join(self.kept_initialised))
        if self.ignored:
            lines.append(f"  in the checkpoint, not used by the backbone ({len(self.ignored)}): "
                         + _abbreviate(self.ignored))
        return "\n".join(lines)


def _abbreviate(names: Sequence[str], limit: int = 8) -> str:
    """Group names by their first component so 300 head keys read as a few prefixes."""
    prefixes: dict[str, int] = {}
    for name in names:
        prefix = name.split(".", 1)[0] + ".*" if "." in name else name
        prefixes[prefix] = prefixes.get(prefix, 0) + 1
    parts = [f"{p} ({n})" if n > 1 else p for p, n in prefixes.items()]
    return ", ".join(parts[:limit]) + (f", … {len(parts) - limit} more" if len(parts) > limit else "")


def _resolve_source(source: str) -> str:
    """A local path as is; an http(s) URL downloaded once into torch's hub cache."""
    if re.match(r"^https?://", source):
        directory = os.path.join(torch.hub.get_dir(), "checkpoints")
        os.makedirs(directory, exist_ok=True)
        target = os.path.join(directory, os.path.basename(source.split("?", 1)[0]))
        if not os.path.isfile(target):
            torch.hub.download_url_to_file(source, target, progress=False)
        return target
    path = os.path.expanduser(source)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone checkpoint {source!r} does not exist; pass the path of an official "
                                "DefMamba classification checkpoint (e.g. defmamba_small.pth) or set "
                                "pretrained=None to start from random weights")
    return path


def load_backbone_weights(backbone: DefMambaBackbone, source: Union[str, Mapping[str, Any]], key: str = "auto",
                          allow_pickle: bool = False) -> BackboneLoadReport:
    """Load classification (or detector/segmentor) weights into a DefMamba backbone.

    ``source`` is a path/URL or an already loaded checkpoint: the authors' ``{'model': ...,
    'model_ema': ...}`` files (``key`` picks as in :func:`defmamba.checkpoint.extract_state_dict`),
    plain state dicts, or an mmdet/mmseg checkpoint whose ``backbone.*`` part is taken.
    The classification head is ignored and the ``outnorm{i}`` norms, which classification
    checkpoints do not have, keep their initial values. Any other backbone tensor that is
    missing, extra or of the wrong shape is a :class:`CheckpointError`: it means the file is of
    another variant (say Small into Tiny) or not a DefMamba checkpoint.
    """
    name = source if isinstance(source, str) else "<state dict>"
    if isinstance(source, str):
        with mmengine_checkpoint_globals():
            checkpoint = safe_load(_resolve_source(source), allow_pickle=allow_pickle)
    else:
        checkpoint = source
    state, _ = extract_state_dict(checkpoint, key=key)
    if any(k.startswith("backbone.") for k in state):
        others = [k for k in state if not k.startswith("backbone.")]
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    else:
        others = []

    own = backbone.state_dict()
    optional = {k for k in own if k.startswith("outnorm")}
    ignored = others + [k for k in state if k.startswith("classifier.")
                        or (k.startswith("outnorm") and k not in own)]
    skip = set(ignored)
    state = {k: v for k, v in state.items() if k not in skip}

    shape_errors = [f"{k}: checkpoint {tuple(v.shape)} vs backbone {tuple(own[k].shape)}"
                    for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state and k not in optional]
    unexpected = [k for k in state if k not in own]
    if shape_errors or missing or unexpected:
        problems = []
        if shape_errors:
            problems.append(f"{len(shape_errors)} shape mismatches, e.g. " + "; ".join(shape_errors[:3]))
        if missing:
            problems.append(f"{len(missing)} backbone tensors missing, e.g. " + ", ".join(missing[:3]))
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected tensors, e.g. " + ", ".join(unexpected[:3]))
        raise CheckpointError(
            f"{name} does not fit this backbone (dims={backbone.dims}, depths={list(backbone.depths)}): "
            + "; ".join(problems) + ". The likely cause is a checkpoint of another variant: pick the config "
            "(tiny/small/base) that matches the file.")

    backbone.load_state_dict(state, strict=False)
    return BackboneLoadReport(source=name, loaded=sorted(state),
                              kept_initialised=sorted(k for k in own if k not in state), ignored=sorted(ignored))


class MM_DefMamba(DefMambaBackbone):  # noqa: N801  (OpenMMLab registry naming)
    """DefMamba backbone for mmdet/mmseg detectors and segmentors.

    Args:
        dims, depths, drop_path_rate, d_state, mlp_ratio, in_chans, use_checkpoint, out_indices:
            as :class:`~defmamba.DefMambaBackbone`.
        frozen_stages: -1 trains everything; k ≥ 0 freezes the patch embedding and, for k ≥ 1,
            stages ``0 .. k-1`` with their ``outnorm``s (kept in eval mode and without gradients).
        pretrained: path or URL of a checkpoint to load in :meth:`init_weights` (shortcut for
            ``init_cfg=dict(type='Pretrained', checkpoint=...)``).
        init_cfg: ``None`` or ``dict(type='Pretrained', checkpoint=PATH, [key='auto'|'model'|'model_ema'])``.
        allow_pickle: load a trusted checkpoint that carries classes outside the safe allowlist.
    """

    def __init__(self, dims: Union[int, Sequence[int]] = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 out_indices: Sequence[int] = (0, 1, 2, 3), drop_path_rate: float = 0.2, d_state: int = 16,
                 mlp_ratio: float = 4.0, in_chans: int = 3, use_checkpoint: bool = False, frozen_stages: int = -1,
                 pretrained: Optional[str] = None, init_cfg: Optional[dict] = None, allow_pickle: bool = False) -> None:
        super().__init__(dims=dims, depths=depths, out_indices=out_indices, drop_path_rate=drop_path_rate,
                         d_state=d_state, mlp_ratio=mlp_ratio, in_chans=in_chans, use_checkpoint=use_checkpoint)
        if pretrained is not None and init_cfg is not None:
            raise ValueError("give either pretrained=PATH or init_cfg=dict(type='Pretrained', checkpoint=PATH), not both")
        if pretrained is not None:
            init_cfg = dict(type="Pretrained", checkpoint=pretrained)
        if init_cfg is not None:
            if not isinstance(init_cfg, Mapping) or init_cfg.get("type") != "Pretrained" or not init_cfg.get("checkpoint"):
                raise ValueError(f"MM_DefMamba init_cfg must be None or dict(type='Pretrained', checkpoint=PATH), "
                                 f"got {init_cfg!r}; the backbone initialises its own weights otherwise")
            init_cfg = dict(init_cfg)
        if not -1 <= frozen_stages <= len(self.layers):
            raise ValueError(f"frozen_stages must be in [-1, {len(self.layers)}], got {frozen_stages}")
        self.init_cfg = init_cfg
        self.frozen_stages = frozen_stages
        self.allow_pickle = allow_pickle
        self.load_report: Optional[BackboneLoadReport] = None
        self._freeze_stages()

    def init_weights(self) -> None:
        """Load ``init_cfg``'s checkpoint (called by the OpenMMLab runner) and log what was loaded."""
        if self.init_cfg is None:
            return
        self.load_report = load_backbone_weights(self, self.init_cfg["checkpoint"], key=self.init_cfg.get("key", "auto"),
                                                 allow_pickle=self.allow_pickle)
        print_log(self.load_report.summary(), logger="current")
        self._freeze_stages()

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        modules: list[nn.Module] = [self.patch_embed]
        for i in range(self.frozen_stages):
            modules.append(self.layers[i])
            if hasattr(self, f"outnorm{i}"):
                modules.append(getattr(self, f"outnorm{i}"))
        return modules

    def _freeze_stages(self) -> None:
        for module in self._frozen_modules():
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> "MM_DefMamba":
        """Switch mode, keeping frozen stages in eval mode."""
        super().train(mode)
        self._freeze_stages()
        return self


for _registry in _REGISTRIES:
    _registry.register_module(name="MM_DefMamba", module=MM_DefMamba, force=True)
