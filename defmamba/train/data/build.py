"""Transforms, samplers and data loaders for training and evaluation."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from PIL import Image, ImageOps
from timm.data import auto_augment as timm_auto_augment
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import transforms as T

from .digits import DigitsDataset
from .errors import DataError
from .folder import ImageFolderDataset, find_classes
from .synthetic import SyntheticDataset

__all__ = ["DataBundle", "build_loaders", "build_transform", "ShardSampler"]

def _posterize_keeping_zero_bits(img, bits_to_keep, **_):
    """timm's posterize, with 0 bits meaning an all-black image as it did before Pillow refused 0.

    RandAugment "inc1" maps magnitude 10 to 0 bits; with magnitude noise (mstd0.5) that happens on
    a few images per batch, and recent Pillow raises ValueError for it.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _pillow_rejects_zero_bits() -> bool:
    try:
        ImageOps.posterize(Image.new("L", (1, 1)), 0)
    except ValueError:
        return True
    return False


if _pillow_rejects_zero_bits():
    for _name, _fn in list(timm_auto_augment.NAME_TO_OP.items()):
        if _fn is timm_auto_augment.posterize:
            timm_auto_augment.NAME_TO_OP[_name] = _posterize_keeping_zero_bits

def build_transform(is_train: bool, config) -> T.Compose:
    """timm's training augmentation, or timm's evaluation transform: resize the short side to
    IMG_SIZE / CROP_PCT and centre-crop IMG_SIZE (the authors' TEST.CROP), or with CROP_PCT 1.0
    resize to IMG_SIZE × IMG_SIZE (their TEST.CROP False)."""
    size = config.DATA.IMG_SIZE
    if is_train:
        aug = config.AUG
        return create_transform(
            input_size=size, is_training=True, scale=tuple(aug.SCALE), hflip=aug.HFLIP,
            color_jitter=aug.COLOR_JITTER if aug.COLOR_JITTER > 0 else None,
            auto_augment=aug.AUTO_AUGMENT if aug.AUTO_AUGMENT not in ("", "none") else None,
            re_prob=aug.REPROB, re_mode=aug.REMODE, re_count=aug.RECOUNT,
            interpolation=config.DATA.INTERPOLATION, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    crop_pct = config.TEST.CROP_PCT
    return create_transform(
        input_size=size, is_training=False, crop_pct=crop_pct, crop_mode="center" if crop_pct < 1.0 else "squash",
        interpolation=config.DATA.INTERPOLATION, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` in order: every sample evaluated exactly once over all ranks."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class DataBundle:
    """Everything the training/evaluation loops need from the data side."""
    dataset_train: Optional[Dataset]
    dataset_val: Dataset
    loader_train: Optional[DataLoader]
    loader_val: DataLoader
    sampler_train: Optional[DistributedSampler]
    mixup_fn: Optional[Mixup]
    num_classes: int
    classes: list


def _datasets(config, need_train: bool):
    if config.DATA.DATASET == "synthetic":
        size, classes = config.DATA.SYNTHETIC_IMAGES, config.MODEL.NUM_CLASSES
        train = SyntheticDataset("train", size, config.DATA.IMG_SIZE, classes) if need_train else None
        val = SyntheticDataset("val", max(1, size // 10), config.DATA.IMG_SIZE, classes)
        return train, val, val.classes
    if config.DATA.DATASET == "digits":
        train = DigitsDataset("train", config.DATA.IMG_SIZE, build_transform(True, config)) if need_train else None
        val = DigitsDataset("val", config.DATA.IMG_SIZE, build_transform(False, config))
        return train, val, DigitsDataset.classes
    root = config.DATA.DATA_PATH
    if not root:
        raise DataError("no data path: pass --data-path /path/to/imagenet (a folder with train/ and val/), "
                        "or use the embedded dataset with --opts DATA.DATASET digits")
    if os.path.exists(root) and not os.path.isdir(root):
        raise DataError(f"data path {root} is a file, not a folder: pass the folder that holds train/ and val/ "
                        "with --data-path (an archive must be extracted first)")
    if not os.path.isdir(root):
        raise DataError(f"data path not found: {root} (pass the folder that holds train/ and val/ with --data-path)")
    val_classes = find_classes(os.path.join(root, "val"))
    classes = find_classes(os.path.join(root, "train")) if need_train else val_classes
    if need_train:
        if val_classes != classes:
            only_train = sorted(set(classes) - set(val_classes))[:5]
            only_val = sorted(set(val_classes) - set(classes))[:5]
            raise DataError(f"train/ and val/ in {root} have different class folders "
                            f"(only in train: {only_train}, only in val: {only_val}); labels would not match")
    train = ImageFolderDataset(os.path.join(root, "train"), classes, build_transform(True, config)) if need_train else None
    val = ImageFolderDataset(os.path.join(root, "val"), classes, build_transform(False, config))
    return train, val, classes


def build_mixup(config, num_classes: int) -> Optional[Mixup]:
    aug = config.AUG
    if aug.MIXUP <= 0 and aug.CUTMIX <= 0 and not aug.CUTMIX_MINMAX:
        return None
    if config.DATA.BATCH_SIZE % 2:
        raise DataError(f"mixup/cutmix needs an even batch size, got DATA.BATCH_SIZE={config.DATA.BATCH_SIZE}; "
                        "change --batch-size or set AUG.MIXUP 0 AUG.CUTMIX 0")
    return Mixup(mixup_alpha=aug.MIXUP, cutmix_alpha=aug.CUTMIX,
                 cutmix_minmax=list(aug.CUTMIX_MINMAX) if aug.CUTMIX_MINMAX else None,
                 prob=aug.MIXUP_PROB, switch_prob=aug.MIXUP_SWITCH_PROB, mode=aug.MIXUP_MODE,
                 label_smoothing=config.MODEL.LABEL_SMOOTHING, num_classes=num_classes)


def build_loaders(config, rank: int, world_size: int, need_train: bool = True, pin_memory: bool = False) -> DataBundle:
    """Datasets, samplers and loaders for this rank. Raises DataError with the fix for unusable data."""
    train, val, classes = _datasets(config, need_train)
    num_classes = len(classes)
    if num_classes > config.MODEL.NUM_CLASSES:
        raise DataError(f"the data has {num_classes} classes but MODEL.NUM_CLASSES is {config.MODEL.NUM_CLASSES}; "
                        f"set --opts MODEL.NUM_CLASSES {num_classes}")
    workers = config.DATA.NUM_WORKERS
    pin = pin_memory and config.DATA.PIN_MEMORY
    batch = config.DATA.BATCH_SIZE
    loader_train = sampler_train = mixup_fn = None
    if need_train:
        per_rank = math.ceil(len(train) / world_size)
        if batch > per_rank:
            raise DataError(f"batch size {batch} per process is larger than the {per_rank} training images each of the "
                            f"{world_size} process(es) gets from {train.root} ({len(train)} images); "
                            "lower --batch-size")
        sampler_train = DistributedSampler(train, num_replicas=world_size, rank=rank, shuffle=True,
                                           seed=config.SEED, drop_last=False)
        loader_train = DataLoader(train, batch_size=batch, sampler=sampler_train, num_workers=workers,
                                  pin_memory=pin, drop_last=True, generator=torch.Generator())
        mixup_fn = build_mixup(config, config.MODEL.NUM_CLASSES)
    loader_val = DataLoader(val, batch_size=batch, sampler=ShardSampler(len(val), rank, world_size),
                            num_workers=workers, pin_memory=pin, drop_last=False)
    return DataBundle(train, val, loader_train, loader_val, sampler_train, mixup_fn, num_classes, list(classes))
