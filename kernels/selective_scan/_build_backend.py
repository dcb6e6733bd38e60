"""PEP 517 backend of this folder's extension package and of the library (the repository's
pyproject.toml points here): setuptools, plus what compiling the CUDA extension needs.

This folder's package always compiles the extension; the library does so only with
DEFMAMBA_BUILD_CUDA=1 (a build without it is plain setuptools). A compiling build

- asks for ninja as a build requirement (torch's BuildExtension compiles in parallel with it), and
- sees the installing environment's PyTorch: pip builds in an isolated environment by default,
  where the already-installed torch (which the extension must be compiled against) is hidden.
  When torch is not importable there, the running interpreter's own site-packages are added to
  the end of sys.path, so `pip install .` works without `--no-build-isolation`. Build
  requirements still come from the isolated environment first.
"""
import os
import sys
import sysconfig
from pathlib import Path

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403

_HERE = Path(__file__).resolve().parent


def _compiles_extension() -> bool:
    """True for this folder's package (pip runs the hooks in the project's directory) and for the
    library built with DEFMAMBA_BUILD_CUDA=1."""
    return Path.cwd().resolve() == _HERE or os.environ.get("DEFMAMBA_BUILD_CUDA", "0") == "1"


def _make_installed_torch_visible() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        for key in ("purelib", "platlib"):
            path = sysconfig.get_paths()[key]
            if path not in sys.path:
                sys.path.append(path)


if _compiles_extension():
    _make_installed_torch_visible()


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + (["ninja"] if _compiles_extension() else [])


def get_requires_for_build_editable(config_settings=None):
    return _setuptools.get_requires_for_build_editable(config_settings) + (["ninja"] if _compiles_extension() else [])
