"""Building the classifier from the config and loading starting weights."""
from __future__ import annotations

import logging

from torch import nn

from ..checkpoint import CheckpointError, extract_state_dict, load_state_dict_checked, safe_load
from ..models.registry import build_model as build_registered_model

__all__ = ["architecture_overrides", "build_model", "load_pretrained", "load_checkpoint_weights",
           "not_a_training_checkpoint"]


def architecture_overrides(config) -> dict:
    """The DefMamba arguments that ``config.MODEL`` sets in place of the variant's values
    (MODEL.DEFMAMBA.* and MODEL.DROP_PATH_RATE; null keys keep the variant's)."""
    spec = config.MODEL.DEFMAMBA
    values = {"dims": spec.DIMS, "depths": spec.DEPTHS, "d_state": spec.D_STATE, "mlp_ratio": spec.MLP_RATIO,
              "drop_path_rate": config.MODEL.DROP_PATH_RATE}
    return {name: tuple(v) if isinstance(v, (list, tuple)) else v for name, v in values.items() if v is not None}


def build_model(config) -> nn.Module:
    """The registered variant MODEL.ARCH (its spec in ``defmamba.variants.VARIANTS``) with the
    overrides of ``config.MODEL``, MODEL.NUM_CLASSES outputs and TRAIN.USE_CHECKPOINT."""
    return build_registered_model(config.MODEL.ARCH, num_classes=config.MODEL.NUM_CLASSES,
                                  use_checkpoint=config.TRAIN.USE_CHECKPOINT, **architecture_overrides(config))


def load_pretrained(model: nn.Module, path: str, logger: logging.Logger, allow_pickle: bool = False) -> None:
    """Start from the weights in ``path`` (its 'model' entry in the official format).

    A classifier head of another number of classes is left freshly initialised (fine-tuning);
    every other key must match.
    """
    obj = safe_load(path, allow_pickle=allow_pickle)
    state, source_key = extract_state_dict(obj, "auto")
    own = model.state_dict()
    head = [k for k in state if k.startswith("classifier.head.") and k in own and state[k].shape != own[k].shape]
    if head:
        logger.info("pretrained head has %s outputs, the model %s: keeping a new head (%s)",
                    state[head[0]].shape[0], own[head[0]].shape[0], ", ".join(head))
        state = {k: v for k, v in state.items() if k not in head}
    report = load_state_dict_checked(model, state, strict=not head, source=f"pretrained weights {path}")
    if head and sorted(report.missing) != sorted(head) or report.unexpected:
        raise CheckpointError(f"pretrained weights {path} do not fit the model: missing {report.missing}, "
                              f"unexpected {report.unexpected}")
    logger.info("loaded pretrained weights from %s%s", path, f" ['{source_key}']" if source_key else "")


def not_a_training_checkpoint(path: str, checkpoint: dict, key: str = "model") -> CheckpointError:
    """The error for ``--resume`` of a file that cannot be continued: it holds weights at most."""
    if key in checkpoint:
        found = "model weights but no training state (optimizer and epoch) to continue"
    else:
        try:
            extract_state_dict(checkpoint, "auto")
            found = "only model weights"
        except CheckpointError:
            found = f"no '{key}' entry (its top-level keys: {sorted(map(str, checkpoint))[:8]})"
    return CheckpointError(f"{path} holds {found}, not a training checkpoint of this application; to start from "
                           f"its weights, pass it with --pretrained {path} instead of --resume")


def load_checkpoint_weights(model: nn.Module, checkpoint: dict, path: str, key: str = "model") -> None:
    """Load the ``key`` entry ('model' or 'model_ema') of the checkpoint read from ``path`` (given
    with --resume) strictly into ``model``; errors name the file and, for a file holding only
    weights, point to --pretrained."""
    if key not in checkpoint:
        raise not_a_training_checkpoint(path, checkpoint, key)
    state, source_key = extract_state_dict(checkpoint, key)
    load_state_dict_checked(model, state, strict=True, source=f"checkpoint {path} ['{source_key}']")
