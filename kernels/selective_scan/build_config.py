"""Build settings of the CUDA selective-scan extension, shared by this folder's setup.py and the
top-level setup.py (``DEFMAMBA_BUILD_CUDA=1 pip install -e .``).

Architectures come from ``TORCH_CUDA_ARCH_LIST`` when set (torch's own variable, e.g. "8.0;9.0"),
else from the GPUs visible at build time, else default to "8.0;9.0".
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

MODULE_NAME = "defmamba_scan_cuda"
DEFAULT_ARCHS = "8.0;9.0"
SOURCES = ("csrc/binding.cpp", "csrc/scan_fwd.cu", "csrc/scan_bwd.cu")


def _default_cuda_home() -> None:
    """Point CUDA_HOME at the toolkit when nvcc on PATH is a wrapper outside it.

    torch guesses CUDA_HOME from the location of `nvcc` (e.g. /usr/local/bin/nvcc -> /usr/local),
    which misses the headers when nvcc is a wrapper script; /usr/local/cuda is the usual toolkit.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc and (Path(nvcc).resolve().parent.parent / "include" / "cuda_runtime_api.h").exists():
        return
    if Path("/usr/local/cuda/include/cuda_runtime_api.h").exists():
        os.environ["CUDA_HOME"] = "/usr/local/cuda"


def extension_kwargs(source_root: Path) -> dict:
    """``setup()`` keyword arguments (ext_modules, cmdclass) that build the extension from ``source_root``."""
    _default_cuda_home()
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    source_root = Path(source_root).resolve()
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        import torch

        if not torch.cuda.is_available():
            # torch would otherwise guess a long list of architectures; compile the supported two.
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
    # setuptools wants source paths relative to the directory setup.py runs from when possible.
    sources = []
    for rel in SOURCES:
        path = source_root / rel
        try:
            sources.append(os.path.relpath(path, Path.cwd()))
        except ValueError:  # different drive (Windows)
            sources.append(str(path))
    ext = CUDAExtension(
        name=MODULE_NAME,
        sources=sources,
        include_dirs=[str(source_root / "csrc")],
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-lineinfo"],
        },
    )
    return dict(ext_modules=[ext], cmdclass={"build_ext": BuildExtension})
