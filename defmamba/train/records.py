"""The records of a training run, kept consistent whenever the process is killed.

Per epoch the run writes, in this order:

1. ``last.pth`` (atomically). It is the commit point: besides the training state it holds
   ``run_records``: the epochs whose weights ``best.pth`` / ``best_ema.pth`` must hold, whether
   this epoch has a ``ckpt_epoch_N.pth``, and the epoch's ``metrics.jsonl`` row;
2. ``ckpt_epoch_N.pth``, ``best.pth``, ``best_ema.pth`` as links to (or copies of) it;
3. the row appended to ``metrics.jsonl``.

A kill between any two steps leaves ``last.pth`` knowing what the others must be, and
:func:`restore_records`, run before training resumes, puts them back: the missing link, the
missing or half-written metrics row. ``metrics.jsonl`` is otherwise only appended to, or
replaced atomically (temporary file, fsync, rename), so after any kill it holds exactly one row
per finished epoch.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import torch

from .run_folder import write_failure
from .utils import checkpoint as run_files

__all__ = ["RECORDS_KEY", "METRICS_NAME", "RunRecords", "read_metrics", "restore_records", "checkpoint_epoch"]

RECORDS_KEY = "run_records"
METRICS_NAME = "metrics.jsonl"


def checkpoint_epoch(path: str) -> Optional[int]:
    """The ``epoch`` stored in our checkpoint ``path`` (read without loading the tensors), or None."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(state["epoch"])
    except Exception:   # missing, foreign or unreadable: it does not hold a known epoch
        return None


def read_metrics(path: str) -> list[dict]:
    """The well-formed rows of ``path`` (a half-written last line is skipped)."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("epoch"), int):
                rows.append(row)
    return rows


def _metrics_text(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def _set_metrics(path: str, rows: list[dict]) -> bool:
    """Make ``path`` hold exactly ``rows`` (one per epoch, in order); rewritten atomically only if it differs."""
    by_epoch = {row["epoch"]: row for row in rows}
    text = _metrics_text([by_epoch[e] for e in sorted(by_epoch)])
    current = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    if current == text:
        return False
    run_files.atomic_write_text(path, text)
    return True


def _append_metrics_row(path: str, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _restore_link(output_dir: str, name: str, epoch: int, source: str, source_epoch: int,
                  logger: logging.Logger) -> None:
    """Make ``name`` hold ``epoch``: from ``source`` (which holds ``source_epoch``) or that epoch's file."""
    target = os.path.join(output_dir, name)
    origin = source if epoch == source_epoch else os.path.join(output_dir, f"ckpt_epoch_{epoch}.pth")
    if os.path.exists(target) and os.path.exists(origin) and os.path.samefile(target, origin):
        return
    if checkpoint_epoch(target) == epoch:
        return
    if checkpoint_epoch(origin) != epoch:
        logger.warning(f"{target} should hold epoch {epoch}, but it does not and no file of that epoch is left "
                       "to restore it from")
        return
    run_files._atomic_copy(origin, target)
    logger.info(f"restored {name} (epoch {epoch}) from {os.path.basename(origin)}: an earlier run stopped before "
                "writing it")


def restore_records(output_dir: str, checkpoint: dict, checkpoint_path: str, logger: logging.Logger) -> None:
    """Bring best.pth, best_ema.pth, the epoch file and metrics.jsonl of ``output_dir`` in line with
    ``checkpoint`` (read from ``checkpoint_path`` in that folder), the state a run resumes from."""
    epoch = int(checkpoint["epoch"])
    records = checkpoint.get(RECORDS_KEY) or {}
    for name, key in (("best.pth", "best_epoch"), ("best_ema.pth", "best_ema_epoch")):
        if records.get(key) is not None:
            _restore_link(output_dir, name, int(records[key]), checkpoint_path, epoch, logger)
    if records.get("epoch_file"):
        _restore_link(output_dir, f"ckpt_epoch_{epoch}.pth", epoch, checkpoint_path, epoch, logger)
    path = os.path.join(output_dir, METRICS_NAME)
    rows = [row for row in read_metrics(path) if row["epoch"] <= epoch]
    if records.get("metrics") and all(row["epoch"] != epoch for row in rows):
        rows.append(records["metrics"])
        logger.info(f"restored the metrics row of epoch {epoch} from {os.path.basename(checkpoint_path)}")
    _set_metrics(path, rows)
    if os.path.exists(path + ".tmp"):
        os.remove(path + ".tmp")


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


class RunRecords:
    """Writes the per-epoch records of a training run in the crash-safe order above."""

    def __init__(self, output_dir: str, checkpoint: Optional[dict] = None) -> None:
        self.output_dir = output_dir
        self.metrics_path = os.path.join(output_dir, METRICS_NAME)
        records = (checkpoint or {}).get(RECORDS_KEY) or {}
        self.best_epoch: Optional[int] = records.get("best_epoch")
        self.best_ema_epoch: Optional[int] = records.get("best_ema_epoch")

    def keep_metrics_before(self, epoch: int) -> None:
        """Drop metrics rows from ``epoch`` on (a fresh run, or epochs a resumed run will redo)."""
        _set_metrics(self.metrics_path, [row for row in read_metrics(self.metrics_path) if row["epoch"] < epoch])

    def save_epoch(self, state: dict, epoch: int, row: dict, *, is_best: bool, is_best_ema: bool,
                   epoch_file: bool, keep: int) -> list[str]:
        """Write ``last.pth`` (``state`` plus the records), its links, then the metrics ``row``.

        Returns the checkpoint paths written. Raises RunFolderError saying why (full disk,
        permissions) when a write fails; the previous complete ``last.pth`` stays in place.
        """
        if is_best:
            self.best_epoch = epoch
        if is_best_ema:
            self.best_ema_epoch = epoch
        state[RECORDS_KEY] = {"best_epoch": self.best_epoch, "best_ema_epoch": self.best_ema_epoch,
                              "epoch_file": epoch_file, "metrics": row}
        last = os.path.join(self.output_dir, "last.pth")
        try:
            written = run_files.save_checkpoint(self.output_dir, state, epoch, epoch_file=epoch_file, keep=keep,
                                                is_best=is_best, is_best_ema=is_best_ema)
            _append_metrics_row(self.metrics_path, row)
        except (OSError, RuntimeError) as err:
            run_files.remove_stale_temporaries(self.output_dir)    # a partial file only takes space
            kept = checkpoint_epoch(last)
            intact = (f"{last} (epoch {kept}) is complete and intact." if kept is not None
                      else "No checkpoint of this run was written yet.")
            raise write_failure(err, last, _tensor_bytes(state), intact) from None
        return written
