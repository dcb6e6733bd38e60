"""The oldest PyTorch the library runs on, checked when ``defmamba`` is imported.

torch 2.6 is the floor because ``checkpoint.py`` reads the official checkpoints' yacs config
through ``torch.serialization.safe_globals`` entries of the form ``(class, "module.Name")``, which
torch 2.6 introduced. The ops need 2.4 and 2.5 APIs besides (``torch.library.custom_op`` with
``register_fake``/``register_autograd``, ``torch.get_autocast_dtype``, ``torch.onnx.export(dynamo=True)``).
pyproject.toml states the same floor (a test keeps the two equal).
"""
from __future__ import annotations

import re
from typing import Optional

import torch

__all__ = ["MIN_TORCH", "check_torch_version"]

MIN_TORCH = (2, 6)


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a torch version string such as '2.6.0+cu124' or '2.10.0a0+git1234'."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ImportError(f"defmamba cannot read the installed torch version {version!r}")
    return int(match.group(1)), int(match.group(2))


def check_torch_version(version: Optional[str] = None) -> None:
    """Raise ImportError when ``version`` (default: the installed torch's) is older than :data:`MIN_TORCH`."""
    version = str(torch.__version__ if version is None else version)
    if _release(version) < MIN_TORCH:
        floor = ".".join(map(str, MIN_TORCH))
        raise ImportError(f"defmamba needs torch>={floor} (found {version}); upgrade with pip install -U torch")
