"""What a checkpoint to continue from means for a new training run, decided before any data is read.

* Auto-resume (the output folder's own ``last.pth``) continues only the same experiment: the
  checkpoint's stored config is compared with the new one on the keys that change what is
  trained (:data:`EXPERIMENT_KEYS`, minus :data:`RUN_ONLY_KEYS`); any difference stops the run
  with the list and the two ways forward. Keys such as PRINT_FREQ, OUTPUT, DATA.NUM_WORKERS,
  SAVE_FREQ or AMP_DTYPE change how a run executes or reports, not what it learns, and are not
  compared.
* An explicit ``--resume`` is the user's deliberate choice: differences are logged, not refused.
* A checkpoint holding the run's last epoch means the run has finished: nothing is trained.
* A file holding weights only (no optimizer state and epoch) cannot be continued: it is refused,
  pointing to ``--pretrained``.
* Before any of this, the records of the folder are brought in line with the checkpoint
  (:func:`~defmamba.train.records.restore_records`).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, Optional

import yaml

from .config import default_config
from .errors import RunFolderError
from .modeling import not_a_training_checkpoint
from .records import restore_records
from .utils.distributed import DistInfo, barrier

__all__ = ["EXPERIMENT_KEYS", "RUN_ONLY_KEYS", "is_experiment_key", "experiment_differences", "is_training_state",
           "prepare_training_folder"]

# A key changes the experiment if it is one of these or lies in one of these sections ...
EXPERIMENT_KEYS = ("MODEL", "TRAIN", "AUG", "TEST", "DATA.DATASET", "DATA.DATA_PATH", "DATA.SYNTHETIC_IMAGES",
                   "DATA.IMG_SIZE", "DATA.INTERPOLATION", "DATA.BATCH_SIZE", "MODEL_EMA", "MODEL_EMA_DECAY", "SEED")
# ... and is not one of these, which only say how this invocation starts or runs.
RUN_ONLY_KEYS = ("MODEL.RESUME", "TRAIN.AUTO_RESUME", "TRAIN.START_EPOCH", "TRAIN.USE_CHECKPOINT",
                 "TRAIN.CUDA_GRAPHS", "TRAIN.GRAPHED_TRAINING", "TRAIN.BACKWARD_ON_CALLING_THREAD")


def _within(key: str, names: tuple[str, ...]) -> bool:
    return any(key == name or key.startswith(name + ".") for name in names)


def is_experiment_key(key: str) -> bool:
    """Whether a difference in ``key`` (e.g. 'TRAIN.BASE_LR') makes another experiment."""
    return _within(key, EXPERIMENT_KEYS) and not _within(key, RUN_ONLY_KEYS)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        out = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: list(node) if isinstance(node, tuple) else node}


def _same_value(key: str, stored: Any, new: Any) -> bool:
    if key == "DATA.DATA_PATH" and stored and new:
        return os.path.normpath(stored) == os.path.normpath(new) or os.path.realpath(stored) == os.path.realpath(new)
    if isinstance(stored, (int, float)) and isinstance(new, (int, float)) and not isinstance(stored, bool):
        return float(stored) == float(new)
    return stored == new


def experiment_differences(stored_config: Any, config) -> Optional[list[str]]:
    """``'KEY: old in the checkpoint, new now'`` for every experiment key that differs; None if the
    stored config cannot be read. A key the stored config lacks (an older version) counts as its default."""
    if isinstance(stored_config, str):
        try:
            stored_config = yaml.safe_load(stored_config)
        except yaml.YAMLError:
            return None
    if not isinstance(stored_config, Mapping):
        return None
    stored, new, defaults = _flatten(stored_config), _flatten(config), _flatten(default_config())
    return [f"{key}: {stored.get(key, defaults.get(key))!r} in the checkpoint, {value!r} now"
            for key, value in new.items()
            if is_experiment_key(key) and not _same_value(key, stored.get(key, defaults.get(key)), value)]


def is_training_state(checkpoint: Mapping) -> bool:
    """Whether ``checkpoint`` holds a full training state to continue (not only weights)."""
    return "optimizer" in checkpoint and "epoch" in checkpoint


def _in_folder(path: str, folder: str) -> bool:
    try:
        return os.path.samefile(os.path.dirname(os.path.abspath(path)), folder)
    except OSError:
        return False


def prepare_training_folder(config, checkpoint: Optional[Mapping], path: str, output_dir: str, info: DistInfo,
                            logger: logging.Logger) -> bool:
    """Refuse a checkpoint that holds no training state, restore the folder's records, refuse another
    experiment's checkpoint on auto-resume, and return True when the run has already finished."""
    if checkpoint is None:
        return False
    if not is_training_state(checkpoint):
        raise not_a_training_checkpoint(path, checkpoint)
    if info.is_main and _in_folder(path, output_dir):
        restore_records(output_dir, checkpoint, path, logger)
    barrier()
    auto = not config.MODEL.RESUME
    differences = experiment_differences(checkpoint.get("config"), config)
    if differences is None:
        logger.warning(f"{path} holds no readable config: cannot check that it belongs to the same experiment")
    elif differences and auto:
        raise RunFolderError(
            f"{output_dir} holds a run with other settings (its checkpoint {path}, epoch {checkpoint['epoch']}); "
            "continuing it with these would mix two experiments:\n  " + "\n  ".join(differences) + "\n"
            "Give this run its own folder with --tag NEW_TAG, or start over in this folder with "
            "--opts TRAIN.AUTO_RESUME False (its checkpoints and metrics will be replaced).")
    elif differences:
        logger.info(f"continuing {path} with changed settings (explicit --resume):\n  " + "\n  ".join(differences))
    epoch = int(checkpoint["epoch"])
    if epoch + 1 < config.TRAIN.EPOCHS:
        return False
    best = f"best top-1 {float(checkpoint.get('max_accuracy', 0.0)):.3f}%"
    if "max_accuray_ema" in checkpoint:
        best += f", best EMA top-1 {float(checkpoint['max_accuray_ema']):.3f}%"
    best_file = os.path.join(output_dir, "best.pth")
    logger.info(f"this run is already finished: {path} holds epoch {epoch}, the last of TRAIN.EPOCHS {config.TRAIN.EPOCHS}; "
                f"{best}" + (f" ({best_file})" if os.path.exists(best_file) else "") + ". Nothing to train. To train "
                f"longer, continue it deliberately with --resume {path} --opts TRAIN.EPOCHS N.")
    return True
