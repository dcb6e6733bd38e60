"""Opening images before the first training step, so that an unreadable file stops the run at
once instead of after an epoch of training (or at the end of it, for a file in val/).

The quick check (always on) decodes the first and the last image of every class folder of every
split; ``DATA.VERIFY_IMAGES True`` decodes every image, in ``DATA.NUM_WORKERS`` worker processes,
each process of a distributed run taking its share.
"""
from __future__ import annotations

import logging
import time

from torch.utils.data import DataLoader, Dataset

from ..utils.distributed import sum_over_ranks
from .decode import load_rgb
from .errors import DataError
from .folder import ImageFolderDataset

__all__ = ["images_to_check", "verify_images"]

_SHOWN = 10     # problems listed in the message


def images_to_check(dataset: ImageFolderDataset, full: bool) -> list[str]:
    """Every image of ``dataset``, or the first and last of each class (its samples are grouped by class)."""
    if full:
        return [path for path, _ in dataset.samples]
    chosen, previous = [], None
    for i, (path, target) in enumerate(dataset.samples):
        next_target = dataset.samples[i + 1][1] if i + 1 < len(dataset.samples) else None
        if target != previous or target != next_target:
            chosen.append(path)
        previous = target
    return chosen


class _OpenEach(Dataset):
    """Item i: "" if image i decodes, else the reason it does not."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> str:
        try:
            load_rgb(self.paths[index])
        except DataError as err:
            return str(err)
        return ""


def _open_all(paths: list[str], workers: int, logger: logging.Logger) -> list[str]:
    loader = DataLoader(_OpenEach(paths), batch_size=64, num_workers=workers, collate_fn=list)
    problems, report_every = [], max(1, len(loader) // 10)
    for i, batch in enumerate(loader):
        problems += [p for p in batch if p]
        if len(loader) >= 20 and (i + 1) % report_every == 0:
            logger.info(f"verified {min((i + 1) * 64, len(paths))} / {len(paths)} images")
    return problems


def verify_images(datasets: list, *, full: bool, workers: int, rank: int, world_size: int,
                  logger: logging.Logger) -> None:
    """Decode the chosen images of the folder datasets in ``datasets`` (others are skipped).

    A collective in a distributed run: every rank checks its share and all ranks stop together.
    Raises DataError listing the files that cannot be read.
    """
    folders = [d for d in datasets if isinstance(d, ImageFolderDataset)]
    if not folders:
        return
    start = time.time()
    paths = [path for dataset in folders for path in images_to_check(dataset, full)]
    problems = _open_all(paths[rank::world_size], workers, logger)
    total = sum_over_ranks(len(problems))
    what = "every image" if full else "the first and last image of every class"
    if total:
        if not problems:
            raise DataError(f"{total} image(s) cannot be read (found by another process, whose message lists them)")
        if len(problems) == 1 and total == 1:
            raise DataError(problems[0])
        listed = "\n  ".join(problems[:_SHOWN]) + (f"\n  ... and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else "")
        raise DataError(f"{total} images cannot be read (checked before training: {what}):\n  {listed}\n"
                        "delete or replace these files")
    hint = "" if full else "; DATA.VERIFY_IMAGES True opens every image"
    logger.info(f"checked {len(paths)} images before training ({what}) in {time.time() - start:.1f} s{hint}")
