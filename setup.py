"""The optional CUDA extension of the library; everything else is declared in pyproject.toml.

``DEFMAMBA_BUILD_CUDA=1 pip install -e .`` compiles the selective-scan extension together with the
library (settings in kernels/selective_scan/build_config.py); ``pip install ./kernels/selective_scan``
builds it on its own. Without the variable this adds nothing.
"""
import os
import sys
from pathlib import Path

from setuptools import setup

KERNEL_DIR = Path(__file__).resolve().parent / "kernels" / "selective_scan"


def cuda_extension_kwargs() -> dict:
    """Extension build arguments when DEFMAMBA_BUILD_CUDA=1, else nothing."""
    if os.environ.get("DEFMAMBA_BUILD_CUDA", "0") != "1":
        return {}
    sys.path.insert(0, str(KERNEL_DIR))  # build_config.py is a file of the kernel folder, not a package
    from build_config import extension_kwargs  # noqa: E402

    return extension_kwargs(source_root=KERNEL_DIR)


setup(**cuda_extension_kwargs())
