"""The output folder of a run: created, proved writable, locked, checked for space, and the
explanation when a write into it fails.

Every check here happens before the first training step, so that a folder that cannot hold the
run stops it at once with the reason, instead of after an epoch of training.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
from contextlib import contextmanager
from typing import Iterator, Optional

from torch import nn

from .errors import RunFolderError
from .run_lock import RunLock
from .utils.checkpoint import atomic_write_text
from .utils.distributed import DistInfo, all_ranks_ok
from .utils.logger import create_logger

__all__ = ["SPACE_FACTOR", "mode_folder", "open_run_folder", "probe_writable", "free_bytes", "checkpoint_bytes",
           "check_free_space", "write_failure", "save_config"]

SPACE_FACTOR = 3    # free space asked for before training, in checkpoint sizes: the next save's
                    # temporary file next to the kept one, and room for an epoch or best file


def mode_folder(run_dir: str, config) -> str:
    """Where this invocation writes: the run folder when training; its ``eval/`` or ``throughput/``
    sub-folder otherwise, so that evaluating never replaces a training run's config.yaml or log."""
    if config.THROUGHPUT_MODE:
        return os.path.join(run_dir, "throughput")
    if config.EVAL_MODE:
        return os.path.join(run_dir, "eval")
    return run_dir


def _reason(err: OSError) -> str:
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if err.errno == errno.EROFS:
        return "the filesystem is read-only"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full" if err.errno == errno.ENOSPC else "the disk quota is exceeded"
    return err.strerror or str(err)


def probe_writable(folder: str) -> Optional[str]:
    """None if a file can be created, written, synced and removed in ``folder``; else the reason."""
    probe = os.path.join(folder, f".write_probe.{socket.gethostname()}.{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(b"defmamba write probe\n")
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as err:
        return _reason(err)
    return None


def _make_folder(folder: str) -> None:
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise RunFolderError(f"output folder {folder} is a file; choose another --output or --tag")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise RunFolderError(f"cannot create output folder {folder}: {_reason(err)}; choose a writable --output") from None
    reason = probe_writable(folder)
    if reason:
        raise RunFolderError(f"cannot write in output folder {folder}: {reason}; fix its permissions or free space, "
                             "or choose another --output")


@contextmanager
def open_run_folder(folder: str, info: DistInfo) -> Iterator[logging.Logger]:
    """Create ``folder``, prove it writable (every rank), lock it (rank 0) and open the run's logger.

    The lock is held until the block ends. All ranks stop together with RunFolderError when one of
    them cannot use the folder.
    """
    problem, lock = None, None
    try:
        _make_folder(folder)
        if info.is_main:
            lock = RunLock(folder).acquire()
    except RunFolderError as err:
        problem = err
    if not all_ranks_ok(problem is None):
        if lock is not None:
            lock.release()
        raise problem or RunFolderError(f"another process of this run cannot use the output folder {folder}; "
                                        "its message says why")
    try:
        logger = create_logger(folder, info.rank)
        if lock is not None and lock.previous is not None:
            logger.info(f"took over the lock of {folder} from {lock.previous.describe()}, which is no longer running")
        yield logger
    finally:
        if lock is not None:
            lock.release()


def free_bytes(folder: str) -> int:
    """Bytes free for this user on the filesystem of ``folder``."""
    return shutil.disk_usage(folder).free


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{int(n)} B"


def checkpoint_bytes(model: nn.Module, with_ema: bool) -> int:
    """Estimated size of one training checkpoint: the weights, their EMA copy, and two optimizer
    moments per trainable parameter (AdamW's; an upper bound for SGD's one)."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return weights * (2 if with_ema else 1) + 2 * trainable


def check_free_space(folder: str, model: nn.Module, with_ema: bool) -> None:
    """RunFolderError unless ``folder`` has room for SPACE_FACTOR checkpoints."""
    size = checkpoint_bytes(model, with_ema)
    free = free_bytes(folder)
    if free < SPACE_FACTOR * size:
        raise RunFolderError(f"not enough free space for checkpoints in {folder}: {_size(free)} free, but a checkpoint "
                             f"of this model takes about {_size(size)} and training needs room for {SPACE_FACTOR} "
                             f"({_size(SPACE_FACTOR * size)}); free space or choose another --output")


def write_failure(err: BaseException, path: str, needed: int, intact: str) -> RunFolderError:
    """The error to stop with when writing ``path`` (about ``needed`` bytes) failed with ``err``.

    torch.save reports a full disk as a RuntimeError without an errno, so the folder is examined
    to tell a full disk from a permission problem. ``intact`` says what survives.
    """
    folder = os.path.dirname(os.path.abspath(path))
    free = free_bytes(folder) if os.path.isdir(folder) else 0
    if isinstance(err, OSError) and err.errno is not None:
        reason = _reason(err)
    elif free < needed:
        reason = "the disk is full"
    else:
        reason = probe_writable(folder) or str(err).strip().splitlines()[0]
    if reason.startswith("the disk"):
        reason += f" ({_size(free)} free in {folder}, about {_size(needed)} needed)"
    return RunFolderError(f"could not write {path}: {reason}. {intact} Free space or fix the folder's permissions, "
                          "then start the same command again to continue.")


def save_config(config, folder: str, logger: logging.Logger) -> None:
    """Write the full config to ``folder``/config.yaml (atomically) and log it."""
    path = os.path.join(folder, "config.yaml")
    try:
        atomic_write_text(path, config.dump())
    except OSError as err:
        raise write_failure(err, path, len(config.dump()), "Nothing else was written.") from None
    logger.info("full config saved to %s:\n%s", path, config.dump())
