"""Rank-aware logging: coloured console output on rank 0, a plain log file per rank."""
from __future__ import annotations

import logging
import os
import sys

from termcolor import colored

__all__ = ["create_logger"]


class _ColorFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.ERROR:
            return colored(text, "red")
        if record.levelno >= logging.WARNING:
            return colored(text, "yellow")
        return text


def create_logger(output_dir: str | None, dist_rank: int = 0, name: str = "defmamba.cls") -> logging.Logger:
    """A logger writing to the console (rank 0 only, coloured) and to ``output_dir/log_rank{r}.txt``.

    Calling it again (e.g. a second run in the same process) replaces the previous handlers.
    """
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    fmt = "[%(asctime)s %(name)s] (%(filename)s %(lineno)d): %(levelname)s %(message)s"
    color_fmt = (colored("[%(asctime)s %(name)s]", "green") + colored("(%(filename)s %(lineno)d)", "yellow")
                 + ": %(levelname)s %(message)s")
    datefmt = "%Y-%m-%d %H:%M:%S"
    if dist_rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(_ColorFormatter(color_fmt, datefmt=datefmt))
        logger.addHandler(console)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        file_handler = logging.FileHandler(os.path.join(output_dir, f"log_rank{dist_rank}.txt"), mode="a")
        file_handler.setFormatter(logging.Formatter(fmt, datefmt=datefmt))
        logger.addHandler(file_handler)
    return logger
