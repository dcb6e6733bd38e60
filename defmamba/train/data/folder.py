"""ImageNet-layout folders: ``root/<split>/<class>/<image>``."""
from __future__ import annotations

import os
from typing import Callable

from torch.utils.data import Dataset

from .decode import load_rgb
from .errors import DataError
from .walk import SplitWalk

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset", "find_classes"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def find_classes(split_dir: str) -> list[str]:
    """Sorted class folder names in ``split_dir``; a clear DataError when there are none."""
    if not os.path.isdir(split_dir):
        root = os.path.dirname(split_dir.rstrip(os.sep))
        if os.path.exists(split_dir):
            raise DataError(f"{split_dir} is a file, not a split folder: the data path must hold train/ and val/ "
                            "folders, each with one sub-folder per class")
        present = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))) if os.path.isdir(root) else []
        raise DataError(f"split folder not found: {split_dir} (the data path must hold train/ and val/ folders, "
                        f"each with one sub-folder per class; found {present or 'no folders'})")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"no class folders in {split_dir}: put the images of each class in their own sub-folder, "
                        f"e.g. {os.path.join(split_dir, 'n01440764', 'image.JPEG')}")
    return classes


class ImageFolderDataset(Dataset):
    """Images of ``split_dir/<class>/**`` labelled by the index of their class in ``classes``.

    Every class folder must contain at least one image. Symbolic links are followed, but a link
    that loops, or that makes a folder or an image reachable twice, is refused
    (:mod:`.walk`). An image that cannot be decoded raises DataError naming the file when it
    is loaded; 16-bit grey images are scaled to 8 bits (:mod:`.decode`).
    """

    def __init__(self, split_dir: str, classes: list[str], transform: Callable | None = None) -> None:
        self.root = split_dir
        self.classes = list(classes)
        self.transform = transform
        self.samples: list[tuple[str, int]] = []
        walk = SplitWalk(IMAGE_EXTENSIONS)
        for index, name in enumerate(self.classes):
            class_dir = os.path.join(split_dir, name)
            if not os.path.isdir(class_dir):
                raise DataError(f"class folder {class_dir} is missing; every split needs the same class folders "
                                f"as train/ ({len(self.classes)} classes)")
            files = walk.images(class_dir)
            if not files:
                raise DataError(f"class folder {class_dir} holds no images (extensions {', '.join(IMAGE_EXTENSIONS)}); "
                                "add images or remove the folder")
            self.samples += [(path, index) for path in files]
        walk.check_linked_files()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        image = load_rgb(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, target
