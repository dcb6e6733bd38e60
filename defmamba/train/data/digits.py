"""The embedded dataset: scikit-learn's 1,797 handwritten digits (8×8, bundled with the package,
no download), upsampled to the training size and split into fixed train/val sets."""
from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["DigitsDataset", "VAL_FRACTION"]

VAL_FRACTION = 0.2
_SPLIT_SEED = 0   # fixed: the split never depends on the training seed


def _split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Stratified, deterministic split: the first VAL_FRACTION of each class (in a fixed shuffle) is val."""
    rng = np.random.RandomState(_SPLIT_SEED)
    chosen = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(len(idx) * VAL_FRACTION))
        chosen.append(idx[:n_val] if split == "val" else idx[n_val:])
    return np.sort(np.concatenate(chosen))


class DigitsDataset(Dataset):
    """``split`` ("train" or "val") of the digits as RGB PIL images of ``img_size``² (bicubic upsampling)."""

    classes = [str(d) for d in range(10)]

    def __init__(self, split: str, img_size: int, transform: Callable | None = None) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        from sklearn.datasets import load_digits

        digits = load_digits()
        labels = digits.target.astype(np.int64)
        keep = _split_indices(labels, split)
        pixels = np.clip(np.round(digits.images[keep] * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        self.images = [Image.fromarray(p).resize((img_size, img_size), Image.BICUBIC).convert("RGB")
                       for p in pixels]
        self.targets = labels[keep].tolist()
        self.transform = transform
        self.root = f"sklearn.datasets.load_digits ({split})"

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]
