"""Checkpoints in the OpenMMLab tools: classification (or detector/segmentor) weights into the
DefMamba backbone, and mmengine's own checkpoints read through
:func:`defmamba.checkpoint.safe_load`.

mmengine 0.10.7 loads its checkpoints with a bare ``torch.load``, which torch ≥ 2.6 refuses
(``weights_only``); :func:`use_safe_checkpoint_loading` makes it read local files with the safe
loader instead, which accepts the one extra call mmengine's files carry
(:func:`mmengine_checkpoint_globals`).
"""
from __future__ import annotations

import contextlib
import os
import os.path as osp
import pickle
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, Union

import torch
from mmengine.logging import HistoryBuffer

from ..checkpoint import CheckpointError, extract_state_dict, safe_load
from ..models import DefMambaBackbone

__all__ = ["BackboneLoadReport", "load_backbone_weights", "mmengine_checkpoint_globals", "use_safe_checkpoint_loading"]

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


def _safe_local_loader(allow_pickle: bool) -> Callable[[str, Any], Any]:
    """mmengine's loader for local files, through the safe loader."""

    def load_from_local(filename: str, map_location: Any = None) -> Any:
        with mmengine_checkpoint_globals():
            return safe_load(osp.expanduser(filename), allow_pickle=allow_pickle,
                             map_location=map_location if map_location is not None else "cpu")

    return load_from_local


def use_safe_checkpoint_loading(allow_pickle: bool = False) -> None:
    """Make mmengine read local checkpoints (``load_from``, ``--resume``, test checkpoints) with
    :func:`defmamba.checkpoint.safe_load`, which reloads mmengine's own files under torch ≥ 2.6."""
    from mmengine.runner import CheckpointLoader

    CheckpointLoader.register_scheme(prefixes="", loader=_safe_local_loader(allow_pickle), force=True)


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
        raise FileNotFoundError(f"backbone checkpoint {source!r} does not exist; put the official DefMamba "
                                "classification checkpoint there (docs/pretrained.md), name another file with "
                                "--cfg-options model.backbone.pretrained=PATH, or start from random weights with "
                                "--cfg-options model.backbone.init_cfg=None (and no model.backbone.pretrained)")
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
