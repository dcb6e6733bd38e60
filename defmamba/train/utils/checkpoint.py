"""Crash-safe checkpoint files in the output directory.

Layout: ``last.pth`` (every epoch), ``ckpt_epoch_N.pth`` (every SAVE_FREQ epochs, the newest
SAVE_KEEP kept), ``best.pth`` / ``best_ema.pth`` (best validation top-1 of the model / its EMA).
Every file is written to ``<name>.tmp``, flushed to disk and renamed over the old one, so a
crash at any moment leaves the previous version intact.
"""
from __future__ import annotations

import contextlib
import glob
import os
import re
from typing import IO, Iterator

import torch

__all__ = ["atomic_save", "atomic_write_text", "save_checkpoint", "find_resume_checkpoint",
           "remove_stale_temporaries", "epoch_checkpoints"]

_EPOCH_RE = re.compile(r"ckpt_epoch_(\d+)\.pth$")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _replacing(path: str, mode: str, **open_kwargs) -> Iterator[IO]:
    """A file to write that replaces ``path`` once complete: written to ``path.tmp``, flushed to
    disk, renamed over ``path``, and the rename itself flushed (the folder's entry)."""
    tmp = path + ".tmp"
    with open(tmp, mode, **open_kwargs) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_save(obj, path: str) -> None:
    """``torch.save`` to ``path`` so that ``path`` is always either the old or the new complete file."""
    with _replacing(path, "wb") as f:
        torch.save(obj, f)


def atomic_write_text(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` so that ``path`` is always either the old or the new complete file."""
    with _replacing(path, "w", encoding="utf-8") as f:
        f.write(text)


def _atomic_copy(src: str, dst: str) -> None:
    """Make ``dst`` a complete copy of ``src`` (a hard link when the filesystem allows it)."""
    tmp = dst + ".tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while chunk := fin.read(1 << 24):
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
    os.replace(tmp, dst)
    _fsync_dir(os.path.dirname(os.path.abspath(dst)))


def epoch_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """``(epoch, path)`` of every ``ckpt_epoch_N.pth`` in ``output_dir``, oldest first."""
    found = []
    for path in glob.glob(os.path.join(output_dir, "ckpt_epoch_*.pth")):
        match = _EPOCH_RE.search(path)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_checkpoint(output_dir: str, state: dict, epoch: int, *, epoch_file: bool, keep: int,
                    is_best: bool = False, is_best_ema: bool = False) -> list[str]:
    """Write ``last.pth`` and, as asked, ``ckpt_epoch_{epoch}.pth``, ``best.pth``, ``best_ema.pth``;
    then delete all but the newest ``keep`` epoch files. Returns the paths written."""
    os.makedirs(output_dir, exist_ok=True)
    last = os.path.join(output_dir, "last.pth")
    atomic_save(state, last)
    written = [last]
    extra = []
    if epoch_file:
        extra.append(f"ckpt_epoch_{epoch}.pth")
    if is_best:
        extra.append("best.pth")
    if is_best_ema:
        extra.append("best_ema.pth")
    for name in extra:
        dst = os.path.join(output_dir, name)
        _atomic_copy(last, dst)
        written.append(dst)
    for _, path in epoch_checkpoints(output_dir)[:-keep]:
        os.remove(path)
    return written


def find_resume_checkpoint(output_dir: str) -> str | None:
    """The checkpoint to continue from: ``last.pth``, else the newest ``ckpt_epoch_N.pth``, else None."""
    last = os.path.join(output_dir, "last.pth")
    if os.path.isfile(last):
        return last
    epochs = epoch_checkpoints(output_dir)
    return epochs[-1][1] if epochs else None


def remove_stale_temporaries(output_dir: str) -> list[str]:
    """Delete ``*.pth.tmp`` files an interrupted save left behind; returns their paths."""
    stale = glob.glob(os.path.join(output_dir, "*.pth.tmp"))
    for path in stale:
        os.remove(path)
    return stale
