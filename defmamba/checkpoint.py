"""Loading checkpoints safely: the official DefMamba releases, our own training checkpoints and
plain state dicts.

A checkpoint is untrusted input. Files are read with ``torch.load(weights_only=True)``; the
only extra classes allowed are the plain containers that real checkpoints carry (the official
files hold a yacs ``CfgNode``; mmengine's hold its config and message-hub objects). Anything
else is refused with the class named, unless the caller opts in with ``allow_pickle=True``
for a file they trust. ``.safetensors`` files (tensors only, no pickle; made from a ``.pth`` by
tools/convert_checkpoint.py) are read with the safetensors package.
"""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn as nn

from .variants import architecture_of, variant_of

__all__ = ["CheckpointError", "LoadReport", "safe_load", "extract_state_dict", "load_checkpoint", "load_state_dict_checked"]

StateDict = dict[str, torch.Tensor]
PathLike = Union[str, os.PathLike]
SAFETENSORS_SUFFIX = ".safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or does not fit the model."""


@dataclass
class LoadReport:
    """What a load did: keys the model lacked in the file, keys the file had in excess, and where
    the weights came from inside the file (e.g. 'model', 'model_ema', 'state_dict', or '')."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    source_key: str = ""


def _trusted_globals() -> list:
    """Classes allowed in addition to tensors and builtins.

    Config objects (yacs ``CfgNode`` in the official files, mmengine's ``ConfigDict``) are dict
    subclasses; they are read back as plain ordered dicts of their entries, so loading needs
    neither package and runs none of their code.
    """
    allowed: list = [(OrderedDict, "yacs.config.CfgNode"), (OrderedDict, "mmengine.config.config.ConfigDict")]
    try:
        from mmengine.logging import HistoryBuffer, MessageHub

        allowed += [HistoryBuffer, MessageHub]
    except ImportError:
        pass
    allowed += _numpy_array_globals()
    return allowed


def _numpy_array_globals() -> list:
    """What pickled numpy arrays and scalars need (mmengine's logs hold some)."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    dtype_classes = [type(np.dtype(name)) for name in ("float64", "float32", "int64", "int32", "bool")]
    return [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype, *dtype_classes]


def _load_safetensors(path: Path, map_location: Any) -> StateDict:
    """The tensors of a ``.safetensors`` file, on ``map_location`` when it names a device, else on the CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
    try:
        return load_file(path, device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: it is not a valid .safetensors file; it is "
                              f"truncated or corrupt ({err})") from err


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.<>]+)")
_UNPICKLER_RE = re.compile(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", re.S)


def _check_is_file(path: Path) -> None:
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in (".pth", ".pt", ".bin", ".ckpt", SAFETENSORS_SUFFIX))[:5]
        hint = f" (it holds {', '.join(inside)})" if inside else ""
        raise CheckpointError(f"checkpoint path {path} is a folder, not a file: pass the checkpoint file inside it{hint}")
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path {path} is not a regular file")


def _not_a_checkpoint(path: Path) -> Optional[str]:
    """Why ``path`` cannot be a PyTorch checkpoint at all, judged from its first bytes; None if it may be one."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return f"checkpoint {path} is empty (0 bytes): it was not written completely; use another copy"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):    # torch's zip format, or a legacy pickle
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"{path} is not a PyTorch checkpoint (it starts with the bytes {head[:16]!r}); pass a .pth or .safetensors file"
    first_line = text.strip().splitlines()[0][:60] if text.strip() else ""
    return (f"{path} is not a PyTorch checkpoint: it is a text file (starting {first_line!r}); "
            "pass a .pth file saved with torch.save")


def _refusal(path: Path, err: pickle.UnpicklingError) -> CheckpointError:
    """A checkpoint torch refused to unpickle: a class outside the allowlist, or a corrupt file.

    torch's own message advises ``weights_only=False``, which is dangerous for a file of unknown
    origin; only the part naming the problem is passed on.
    """
    message = str(err)
    found = _GLOBAL_RE.search(message)
    if found:
        return CheckpointError(
            f"checkpoint {path} refers to the Python object {found.group(1)}, which is not one of the plain types "
            "allowed in checkpoints; loading it could run code from the file. Only if you trust the file's "
            "source, load it with allow_pickle=True (on the command line: --unsafe-load).")
    detail = _UNPICKLER_RE.search(message)
    reason = f" ({detail.group(1).strip()})" if detail else ""
    return CheckpointError(f"cannot read checkpoint {path}: it is truncated or corrupt{reason}")


def safe_load(path: PathLike, allow_pickle: bool = False, map_location: Any = "cpu") -> Any:
    """Read a checkpoint file with ``weights_only=True`` and a small allowlist of plain classes.

    A ``.safetensors`` file holds one set of weights and is returned as ``{'model': weights}``,
    the layout of the official files, so everything that takes those takes it.

    Raises:
        CheckpointError: the file is missing, a folder, not a checkpoint, truncated or corrupt, or
            holds a class outside the allowlist (the message names it and the opt-in
            ``allow_pickle=True``).
    """
    path = Path(path)
    _check_is_file(path)
    if path.suffix == SAFETENSORS_SUFFIX:
        return {"model": _load_safetensors(path, map_location)}
    problem = _not_a_checkpoint(path)
    if problem:
        raise CheckpointError(problem)
    if allow_pickle:
        try:
            return torch.load(path, map_location=map_location, weights_only=False)
        except (EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as err:
            raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    try:
        with torch.serialization.safe_globals(_trusted_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:    # not chained: torch's text advises weights_only=False
        raise _refusal(path, err) from None
    except Exception as err:  # noqa: BLE001 - no code runs with weights_only=True: any failure means a damaged file
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: it is truncated or corrupt ({detail})") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def extract_state_dict(obj: Any, key: str = "auto") -> tuple[StateDict, str]:
    """Find the weights inside a loaded checkpoint.

    ``key="auto"`` takes, in order, 'model' (official and our checkpoints), 'state_dict'
    (mmengine, Lightning), 'module', or the object itself if it is a state dict. Any other
    ``key`` (e.g. 'model_ema') is looked up directly. A leading 'module.' (DDP) is removed.

    Returns:
        (state_dict, source_key)
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a dict of weights")
    if key == "auto":
        candidates = [k for k in ("model", "state_dict", "module") if k in obj and _is_state_dict(obj[k])]
        if candidates:
            key = candidates[0]
        elif _is_state_dict(obj):
            key = ""
        else:
            raise CheckpointError(
                f"no weights found in checkpoint: top-level keys are {sorted(map(str, obj))[:12]}; "
                "expected 'model', 'state_dict' or a plain state dict (pass key=... to choose one)")
    if key:
        if key not in obj:
            raise CheckpointError(f"checkpoint has no '{key}' entry; it has {sorted(map(str, obj))[:12]}")
        state = obj[key]
        if not _is_state_dict(state):
            raise CheckpointError(f"checkpoint entry '{key}' is not a state dict of tensors")
    else:
        state = obj
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state), key


def _shape_mismatches(model_state: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> list[str]:
    return [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
            for k, v in model_state.items() if k in state and state[k].shape != v.shape]


def _likely_cause(model: nn.Module, state: Mapping[str, torch.Tensor], mismatched: list[str], missing: list[str],
                  unexpected: list[str]) -> str:
    """A one-line guess at why a checkpoint does not fit, for the error message."""
    width, depths = architecture_of(state)
    variant = variant_of(state)
    found = f"DefMamba-{variant.capitalize()}" if variant else f"a model with width {width} and depths {depths}"
    model_dims = getattr(model, "dims", [None])[0]
    model_depths = getattr(model, "depths", None)
    if width is not None and (width != model_dims or depths != tuple(model_depths or ())):
        return f"the checkpoint looks like {found}, but the model has width {model_dims} and depths {model_depths}: build the matching variant"
    if any(k.startswith("classifier.head") for k in mismatched):
        return "the classifier head has a different number of classes: drop 'classifier.head.*' or build the model with the checkpoint's num_classes"
    if missing and all(k.startswith("outnorm") for k in missing):
        return "a classification checkpoint loaded into a backbone: the outnorm layers are new (load with strict=False)"
    if unexpected and all(k.startswith("classifier.") for k in unexpected):
        return "a classification checkpoint loaded into a backbone: its classifier is not used (load with strict=False)"
    return "the checkpoint was saved from a different architecture"


def load_state_dict_checked(model: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True,
                            source: str = "state dict") -> LoadReport:
    """``model.load_state_dict`` with shape checking and an explanatory error on mismatch.

    Shape-mismatched keys are always an error; missing/unexpected keys only when ``strict``.
    """
    model_state = model.state_dict()
    mismatched = _shape_mismatches(model_state, state)
    missing = [k for k in model_state if k not in state]
    unexpected = [k for k in state if k not in model_state]
    if mismatched or (strict and (missing or unexpected)):
        def listing(title: str, items: list[str]) -> str:
            shown = "\n    ".join(items[:20]) + (f"\n    ... and {len(items) - 20} more" if len(items) > 20 else "")
            return f"\n  {title} ({len(items)}):\n    {shown}" if items else ""
        raise CheckpointError(
            f"{source} does not fit {type(model).__name__}: "
            f"{_likely_cause(model, state, mismatched, missing, unexpected)}."
            + listing("missing in checkpoint", missing) + listing("unexpected in checkpoint", unexpected)
            + listing("shape mismatch", mismatched))
    model.load_state_dict(state, strict=False)
    return LoadReport(missing=missing, unexpected=unexpected)


def load_checkpoint(model: nn.Module, checkpoint: Union[PathLike, Mapping[str, Any]], key: str = "auto",
                    strict: bool = True, allow_pickle: bool = False) -> LoadReport:
    """Load weights from a file or an already loaded checkpoint object into ``model``.

    Accepts the official format (``{'model': ..., 'model_ema': ...}``; ``key='model_ema'`` picks
    the EMA weights), our training checkpoints, mmengine's ``state_dict``, plain state dicts and
    ``.safetensors`` files, with or without a DDP ``module.`` prefix. Loads strictly by default.

    Raises:
        CheckpointError: unreadable file, no weights in it, or weights that do not fit the model
            (the message lists missing, unexpected and shape-mismatched keys and the likely cause).
    """
    source = "checkpoint"
    if isinstance(checkpoint, (str, os.PathLike)):
        source = f"checkpoint {checkpoint}"
        checkpoint = safe_load(checkpoint, allow_pickle=allow_pickle)
    state, source_key = extract_state_dict(checkpoint, key)
    if source_key:
        source += f" ['{source_key}']"
    report = load_state_dict_checked(model, state, strict=strict, source=source)
    report.source_key = source_key
    return report
