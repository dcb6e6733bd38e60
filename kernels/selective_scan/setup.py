"""Standalone build of the DefMamba selective-scan CUDA extension.

    pip install --no-build-isolation ./kernels/selective_scan      # from the repository root
    cd kernels/selective_scan && pip install --no-build-isolation .

Needs PyTorch (with CUDA) already installed and an nvcc matching its CUDA major version.
"""
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from build_config import MODULE_NAME, extension_kwargs  # noqa: E402

setup(
    name=MODULE_NAME.replace("_", "-"),
    version="0.1.0",
    description="CUDA selective scan for DefMamba (forward and backward kernels)",
    python_requires=">=3.9",
    **extension_kwargs(source_root=HERE),
)
