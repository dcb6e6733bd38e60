"""Configuration of the classification application (yacs).

Every key below is read by the application; a key in a YAML file or in ``--opts`` that is not
listed here is an error, and so is a value of the wrong type. YAML files may inherit from other
files with ``BASE: ['relative/path.yaml']``.
"""
from __future__ import annotations

import argparse
import difflib
import os
from typing import Sequence

import yaml
from yacs.config import CfgNode as CN

from ..variants import VARIANTS

__all__ = ["ConfigError", "get_config", "default_config", "AMP_DTYPES"]

AMP_DTYPES = ("float16", "bfloat16")
DATASETS = ("imagenet", "digits", "synthetic")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "step")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
ARCHS = tuple(f"defmamba_{variant}" for variant in VARIANTS)


class ConfigError(ValueError):
    """A configuration file, key or value cannot be used."""


_C = CN()
_C.BASE = [""]

# ---------------------------------------------------------------- data
_C.DATA = CN()
_C.DATA.BATCH_SIZE = 128          # per process
_C.DATA.DATA_PATH = ""            # ImageNet-layout root: train/<class>/*, val/<class>/*
_C.DATA.DATASET = "imagenet"      # "imagenet" (any folder in that layout), "digits" (embedded) or "synthetic"
_C.DATA.SYNTHETIC_IMAGES = 12800  # "synthetic" only: training images (validation gets a tenth)
_C.DATA.IMG_SIZE = 224
_C.DATA.INTERPOLATION = "bicubic"
_C.DATA.PIN_MEMORY = True
_C.DATA.NUM_WORKERS = 8
_C.DATA.VERIFY_IMAGES = False     # decode every image before training (the first and last of each class always are)

# ---------------------------------------------------------------- model
_C.MODEL = CN()
_C.MODEL.NAME = "defmamba_tiny_224"   # names the output folder
_C.MODEL.ARCH = "defmamba_tiny"       # registered variant: its widths, depths and drop path (defmamba.variants.VARIANTS)
_C.MODEL.PRETRAINED = ""              # weights to start from (model only)
_C.MODEL.RESUME = ""                  # full training state to continue from / evaluate
_C.MODEL.NUM_CLASSES = 1000
_C.MODEL.DROP_PATH_RATE = None        # null: the variant's
_C.MODEL.LABEL_SMOOTHING = 0.1
_C.MODEL.DEFMAMBA = CN()              # custom architectures: a key set here replaces the variant's value
_C.MODEL.DEFMAMBA.DIMS = None         # width of stage 0 (doubled per stage)
_C.MODEL.DEFMAMBA.DEPTHS = None       # blocks per stage, 4 entries
_C.MODEL.DEFMAMBA.D_STATE = None      # SSM state size
_C.MODEL.DEFMAMBA.MLP_RATIO = None    # MLP expansion

# ---------------------------------------------------------------- training
_C.TRAIN = CN()
_C.TRAIN.START_EPOCH = 0
_C.TRAIN.EPOCHS = 300
_C.TRAIN.WARMUP_EPOCHS = 20
_C.TRAIN.WEIGHT_DECAY = 0.05
# Also exempt A_logs, dt_projs_bias and rpe_table from weight decay (the authors decay them; their
# code marks A_logs and Ds `_no_weight_decay`, as Mamba does, but their optimizer never reads the mark).
_C.TRAIN.NO_DECAY_SSM_PARAMS = False
_C.TRAIN.BASE_LR = 5e-4           # for a global batch of 512, scaled linearly
_C.TRAIN.WARMUP_LR = 5e-7
_C.TRAIN.MIN_LR = 5e-6
_C.TRAIN.CLIP_GRAD = 5.0          # 0 disables clipping (the norm is still logged)
_C.TRAIN.AUTO_RESUME = True
_C.TRAIN.ACCUMULATION_STEPS = 1
_C.TRAIN.USE_CHECKPOINT = False   # activation checkpointing in the model
_C.TRAIN.CUDA_GRAPHS = False      # replay each training step from a CUDA graph (GPU, DDP too; no accumulation)
# Replay only the model's forward and backward from CUDA graphs (model.set_graphed_training()); the
# loss, DDP's all-reduce, gradient accumulation, clipping, the optimizer and the EMA stay eager (GPU).
_C.TRAIN.GRAPHED_TRAINING = False
# Run each backward on the training loop's own thread, not on autograd's per-GPU worker thread
# (torch.autograd.set_multithreading_enabled(False)). On some hosts the hand-over to that thread
# costs an eager DefMamba step much host time (docs/benchmarks.md); False restores PyTorch's default.
_C.TRAIN.BACKWARD_ON_CALLING_THREAD = True
_C.TRAIN.LR_SCHEDULER = CN()
_C.TRAIN.LR_SCHEDULER.NAME = "cosine"
_C.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 30   # "step" only
_C.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.1    # "step" only
_C.TRAIN.OPTIMIZER = CN()
_C.TRAIN.OPTIMIZER.NAME = "adamw"
_C.TRAIN.OPTIMIZER.EPS = 1e-8
_C.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)
_C.TRAIN.OPTIMIZER.MOMENTUM = 0.9         # "sgd" only

# ---------------------------------------------------------------- augmentation
_C.AUG = CN()
_C.AUG.COLOR_JITTER = 0.4                       # timm applies it only while AUTO_AUGMENT is "none"
_C.AUG.AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"   # "none" disables
_C.AUG.REPROB = 0.25
_C.AUG.REMODE = "pixel"
_C.AUG.RECOUNT = 1
_C.AUG.HFLIP = 0.5
_C.AUG.SCALE = (0.08, 1.0)                       # RandomResizedCrop area range
_C.AUG.MIXUP = 0.8
_C.AUG.CUTMIX = 1.0
_C.AUG.CUTMIX_MINMAX = []                        # [min, max] ratio; empty = use CUTMIX alpha
_C.AUG.MIXUP_PROB = 1.0
_C.AUG.MIXUP_SWITCH_PROB = 0.5
_C.AUG.MIXUP_MODE = "batch"

# ---------------------------------------------------------------- evaluation
_C.TEST = CN()
_C.TEST.CROP_PCT = 0.875   # resize the short side to IMG_SIZE / CROP_PCT, centre-crop IMG_SIZE; 1.0: resize to IMG_SIZE²

# ---------------------------------------------------------------- misc
_C.AMP_ENABLE = True
_C.AMP_DTYPE = "float16"
_C.MODEL_EMA = True
_C.MODEL_EMA_DECAY = 0.9999
_C.COMPILE = False
_C.OUTPUT = "output"
_C.TAG = "default"
_C.SAVE_FREQ = 1        # write ckpt_epoch_N.pth every SAVE_FREQ epochs (and at the end)
_C.SAVE_KEEP = 3        # keep this many ckpt_epoch_N.pth files (last.pth/best*.pth always kept)
_C.PRINT_FREQ = 10
_C.SEED = 0
_C.EVAL_MODE = False
_C.THROUGHPUT_MODE = False


def default_config() -> CN:
    """A fresh copy of the defaults."""
    return _C.clone()


def _merge_file(config: CN, cfg_file: str, chain: tuple = ()) -> None:
    cfg_file = os.path.abspath(cfg_file)
    if cfg_file in chain:
        raise ConfigError(f"config files include each other in a loop: {' -> '.join(chain + (cfg_file,))}")
    if not os.path.isfile(cfg_file):
        here = os.path.dirname(cfg_file)
        near = sorted(f for f in os.listdir(here) if f.endswith((".yaml", ".yml"))) if os.path.isdir(here) else []
        hint = f" Config files in {here}: {', '.join(near)}." if near else ""
        raise ConfigError(f"config file not found: {cfg_file}.{hint}")
    with open(cfg_file, encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {cfg_file} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {cfg_file} must hold a mapping of keys, got {type(raw).__name__}")
    for base in raw.get("BASE", [""]) or [""]:
        if base:
            _merge_file(config, os.path.join(os.path.dirname(cfg_file), base), chain + (cfg_file,))
    config.defrost()
    try:
        config.merge_from_other_cfg(CN(_ints_to_floats(raw, config)))
    except (KeyError, ValueError, AssertionError) as err:
        raise ConfigError(f"in {cfg_file}: {_describe(err)}") from None


def _ints_to_floats(raw: dict, defaults: CN) -> dict:
    """Let an integer stand for a float key (``WEIGHT_DECAY: 0``); every other type must match."""
    out = {}
    for key, value in raw.items():
        default = defaults.get(key) if isinstance(defaults, CN) else None
        if isinstance(value, dict) and isinstance(default, CN):
            value = _ints_to_floats(value, default)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        out[key] = value
    return out


def _opts_ints_to_floats(opts: list, config: CN) -> list:
    out = list(opts)
    for i in range(0, len(out), 2):
        node = config
        for part in str(out[i]).split("."):
            node = node.get(part) if isinstance(node, CN) else None
        if isinstance(node, float):
            try:
                out[i + 1] = repr(float(int(str(out[i + 1]))))
            except ValueError:
                pass
    return out


def _describe(err: Exception) -> str:
    text = str(err.args[0]) if err.args else str(err)
    if text.startswith(("Non-existent config key", "Non-existent key")):
        key = text.split(":", 1)[1].strip()
        close = difflib.get_close_matches(key, _all_keys(_C), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}?" if close else "the valid keys are in defmamba/train/config.py"
        return f"unknown config key {key}; {hint}"
    if "Type mismatch" in text:
        return f"wrong value type: {text}"
    return text


def _all_keys(node: CN, prefix: str = "") -> list:
    keys = []
    for key, value in node.items():
        keys += _all_keys(value, f"{prefix}{key}.") if isinstance(value, CN) else [prefix + key]
    return keys


def _check_choices(config: CN) -> None:
    rules = [
        ("DATA.DATASET", config.DATA.DATASET, DATASETS),
        ("DATA.INTERPOLATION", config.DATA.INTERPOLATION, INTERPOLATIONS),
        ("AMP_DTYPE", config.AMP_DTYPE, AMP_DTYPES),
        ("TRAIN.OPTIMIZER.NAME", config.TRAIN.OPTIMIZER.NAME, OPTIMIZERS),
        ("TRAIN.LR_SCHEDULER.NAME", config.TRAIN.LR_SCHEDULER.NAME, SCHEDULERS),
        ("AUG.MIXUP_MODE", config.AUG.MIXUP_MODE, ("batch", "pair", "elem")),
    ]
    for key, value, choices in rules:
        if value not in choices:
            raise ConfigError(f"{key} = {value!r} is not one of {', '.join(map(repr, choices))}")
    positive = [("DATA.BATCH_SIZE", config.DATA.BATCH_SIZE), ("TRAIN.ACCUMULATION_STEPS", config.TRAIN.ACCUMULATION_STEPS),
                ("SAVE_FREQ", config.SAVE_FREQ), ("SAVE_KEEP", config.SAVE_KEEP), ("PRINT_FREQ", config.PRINT_FREQ),
                ("MODEL.NUM_CLASSES", config.MODEL.NUM_CLASSES), ("TRAIN.EPOCHS", config.TRAIN.EPOCHS),
                ("DATA.SYNTHETIC_IMAGES", config.DATA.SYNTHETIC_IMAGES)]
    for key, value in positive:
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    if config.DATA.IMG_SIZE < 32:
        raise ConfigError(f"DATA.IMG_SIZE must be at least 32 (the model downsamples by 32), got {config.DATA.IMG_SIZE}")
    if not 0 < config.TEST.CROP_PCT <= 1:
        raise ConfigError(f"TEST.CROP_PCT must be in (0, 1], got {config.TEST.CROP_PCT}")
    _check_architecture(config.MODEL)
    if config.TRAIN.LR_SCHEDULER.NAME == "step" and config.TRAIN.LR_SCHEDULER.DECAY_EPOCHS < 1:
        raise ConfigError(f"TRAIN.LR_SCHEDULER.DECAY_EPOCHS must be at least 1, got {config.TRAIN.LR_SCHEDULER.DECAY_EPOCHS}")
    if config.AUG.CUTMIX_MINMAX and len(config.AUG.CUTMIX_MINMAX) != 2:
        raise ConfigError(f"AUG.CUTMIX_MINMAX must be empty or [min, max], got {list(config.AUG.CUTMIX_MINMAX)}")
    if len(config.AUG.SCALE) != 2:
        raise ConfigError(f"AUG.SCALE must be [min, max], got {list(config.AUG.SCALE)}")
    if config.TRAIN.CUDA_GRAPHS and config.TRAIN.ACCUMULATION_STEPS != 1:
        raise ConfigError("TRAIN.CUDA_GRAPHS records one micro-batch per optimizer step: set "
                          f"TRAIN.ACCUMULATION_STEPS 1 (got {config.TRAIN.ACCUMULATION_STEPS}) or turn the graphs off")
    if config.TRAIN.CUDA_GRAPHS and config.COMPILE:
        raise ConfigError("TRAIN.CUDA_GRAPHS and --compile cannot be combined; choose one")
    if config.TRAIN.GRAPHED_TRAINING:
        other = ("TRAIN.CUDA_GRAPHS (the whole step in one graph)" if config.TRAIN.CUDA_GRAPHS
                 else "--compile" if config.COMPILE
                 else "TRAIN.USE_CHECKPOINT (its recomputation cannot be recorded)" if config.TRAIN.USE_CHECKPOINT
                 else None)
        if other:
            raise ConfigError(f"TRAIN.GRAPHED_TRAINING cannot be combined with {other}; choose one")
    _check_ranges(config)
    if not 0 <= config.TRAIN.WARMUP_EPOCHS <= config.TRAIN.EPOCHS:
        raise ConfigError(f"TRAIN.WARMUP_EPOCHS ({config.TRAIN.WARMUP_EPOCHS}) must be within [0, TRAIN.EPOCHS={config.TRAIN.EPOCHS}]")


def _is_int_list(value, length: int) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == length and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)


def _check_architecture(model: CN) -> None:
    """MODEL.ARCH names a variant; each override of its values is null or of a usable type."""
    if model.ARCH not in ARCHS:
        raise ConfigError(f"MODEL.ARCH = {model.ARCH!r} is not one of {', '.join(map(repr, ARCHS))}; "
                          "set MODEL.DEFMAMBA.* for other widths and depths")
    number = (int, float)
    rules = [
        ("MODEL.DEFMAMBA.DIMS", model.DEFMAMBA.DIMS, lambda v: (isinstance(v, int) and v > 0) or _is_int_list(v, 4),
         "a positive integer (stage-0 width) or 4 stage widths"),
        ("MODEL.DEFMAMBA.DEPTHS", model.DEFMAMBA.DEPTHS, lambda v: _is_int_list(v, 4), "a list of 4 stage depths"),
        ("MODEL.DEFMAMBA.D_STATE", model.DEFMAMBA.D_STATE, lambda v: isinstance(v, int) and v > 0, "a positive integer"),
        ("MODEL.DEFMAMBA.MLP_RATIO", model.DEFMAMBA.MLP_RATIO, lambda v: isinstance(v, number) and v > 0,
         "a positive number"),
        ("MODEL.DROP_PATH_RATE", model.DROP_PATH_RATE, lambda v: isinstance(v, number) and 0 <= v < 1,
         "a number in [0, 1)"),
    ]
    for key, value, valid, expected in rules:
        if value is not None and (isinstance(value, bool) or not valid(value)):
            raise ConfigError(f"{key} must be {expected} (or null for the value of {model.ARCH}), got {value!r}")


def _check_ranges(config: CN) -> None:
    """Numbers that would otherwise fail deep inside the run or silently train nothing."""
    if not config.TRAIN.BASE_LR > 0:
        raise ConfigError(f"TRAIN.BASE_LR must be positive, got {config.TRAIN.BASE_LR} "
                          "(it is the peak learning rate for a global batch of 512, e.g. 5e-4)")
    for key, value in (("TRAIN.WARMUP_LR", config.TRAIN.WARMUP_LR), ("TRAIN.MIN_LR", config.TRAIN.MIN_LR),
                       ("TRAIN.WEIGHT_DECAY", config.TRAIN.WEIGHT_DECAY), ("TRAIN.CLIP_GRAD", config.TRAIN.CLIP_GRAD),
                       ("DATA.NUM_WORKERS", config.DATA.NUM_WORKERS)):
        if value < 0:
            raise ConfigError(f"{key} must be at least 0, got {value}")
    if not 0.0 <= config.MODEL_EMA_DECAY <= 1.0:
        raise ConfigError(f"MODEL_EMA_DECAY (--model_ema_decay) must be in [0, 1], got {config.MODEL_EMA_DECAY}; "
                          "the paper's recipe uses 0.9999")
    if not 0 <= config.TRAIN.START_EPOCH < config.TRAIN.EPOCHS:
        raise ConfigError(f"TRAIN.START_EPOCH ({config.TRAIN.START_EPOCH}) must be in [0, TRAIN.EPOCHS="
                          f"{config.TRAIN.EPOCHS}): a run starting at or after its last epoch trains nothing")


def get_config(args: argparse.Namespace | None = None, cfg_file: str | None = None,
               opts: Sequence[str] | None = None) -> CN:
    """Defaults ← ``--cfg`` file (and its BASE files) ← ``--opts`` ← the other command-line flags.

    ``args`` is the namespace of ``main.parse_args``; ``cfg_file``/``opts`` are used when it is None.
    Raises ConfigError for a missing file, an unknown key, a wrong type or an invalid value.
    """
    config = default_config()
    if args is not None:
        cfg_file, opts = args.cfg, args.opts
    if cfg_file:
        _merge_file(config, cfg_file)
    config.defrost()
    if opts:
        if len(opts) % 2:
            raise ConfigError(f"--opts takes KEY VALUE pairs; got an odd number of items: {list(opts)}")
        try:
            config.merge_from_list(_opts_ints_to_floats(list(opts), config))
        except (KeyError, ValueError, AssertionError) as err:
            raise ConfigError(f"in --opts: {_describe(err)}") from None
    if args is not None:
        _apply_args(config, args)
    _check_choices(config)
    config.freeze()
    return config


def _apply_args(config: CN, args: argparse.Namespace) -> None:
    mapping = [
        ("batch_size", "DATA.BATCH_SIZE"), ("data_path", "DATA.DATA_PATH"), ("pretrained", "MODEL.PRETRAINED"),
        ("resume", "MODEL.RESUME"), ("accumulation_steps", "TRAIN.ACCUMULATION_STEPS"), ("amp_dtype", "AMP_DTYPE"),
        ("output", "OUTPUT"), ("tag", "TAG"), ("model_ema", "MODEL_EMA"), ("model_ema_decay", "MODEL_EMA_DECAY"),
        ("seed", "SEED"),
    ]
    for attr, key in mapping:
        value = getattr(args, attr, None)
        if value is not None:
            node, leaf = config, key.split(".")
            for part in leaf[:-1]:
                node = node[part]
            node[leaf[-1]] = value
    if getattr(args, "use_checkpoint", False):
        config.TRAIN.USE_CHECKPOINT = True
    if getattr(args, "disable_amp", False):
        config.AMP_ENABLE = False
    if getattr(args, "eval", False):
        config.EVAL_MODE = True
    if getattr(args, "throughput", False):
        config.THROUGHPUT_MODE = True
    if getattr(args, "compile", False):
        config.COMPILE = True
