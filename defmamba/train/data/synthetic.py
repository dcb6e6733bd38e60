"""Random images with learnable labels, generated on the fly: for speed, scaling and numerical
stability runs that should not depend on a dataset or on the CPU-side image pipeline."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["SyntheticDataset"]

_PATTERN_SIZE = 8     # each class is a low-frequency colour pattern, upsampled to the image size
_SIGNAL = 0.5         # pattern amplitude over unit Gaussian noise


class SyntheticDataset(Dataset):
    """``num_images`` normalised (3, img_size, img_size) tensors; image i has label i % num_classes.

    Image i is its class pattern plus Gaussian noise, both drawn from generators seeded by
    (i, split) and the label, so every process and every epoch sees the same images.
    """

    def __init__(self, split: str, num_images: int, img_size: int, num_classes: int) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.split_offset = 0 if split == "train" else 1   # train images use even seeds, val odd ones
        self.num_images, self.img_size, self.num_classes = num_images, img_size, num_classes
        self.classes = [str(c) for c in range(num_classes)]
        self.targets = [i % num_classes for i in range(num_images)]
        self.root = f"synthetic ({split}, {num_images} images)"

    def __len__(self) -> int:
        return self.num_images

    def _pattern(self, label: int) -> torch.Tensor:
        g = torch.Generator().manual_seed((1 << 31) + label)  # apart from the noise seeds (< 2**31)
        coarse = torch.randn(1, 3, _PATTERN_SIZE, _PATTERN_SIZE, generator=g)
        return F.interpolate(coarse, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = self.targets[index]
        g = torch.Generator().manual_seed(2 * index + self.split_offset)
        noise = torch.randn(3, self.img_size, self.img_size, generator=g)
        return noise + _SIGNAL * self._pattern(label), label
