"""Install the defmamba library: `pip install -e .`.

The CUDA selective-scan extension is optional and never built by default; set
DEFMAMBA_BUILD_CUDA=1 to build it together with the library (or run
`pip install ./kernels/selective_scan` on its own).
"""
import os
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def read_version() -> str:
    text = (HERE / "defmamba" / "version.py").read_text()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def cuda_extension_kwargs() -> dict:
    """Extension build arguments when DEFMAMBA_BUILD_CUDA=1, else nothing."""
    if os.environ.get("DEFMAMBA_BUILD_CUDA", "0") != "1":
        return {}
    import sys

    sys.path.insert(0, str(HERE / "kernels" / "selective_scan"))
    from build_config import extension_kwargs  # noqa: E402  (shared with the standalone kernel package)

    return extension_kwargs(source_root=HERE / "kernels" / "selective_scan")


requirements = [line.strip() for line in (HERE / "requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

setup(
    name="defmamba",
    version=read_version(),
    description="DefMamba: Deformable Visual State Space Model (CVPR 2025) — models, kernels and training",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["defmamba", "defmamba.*"]),
    install_requires=requirements,
    extras_require={
        "test": ["pytest>=7", "scikit-learn", "matplotlib", "onnx", "onnxruntime", "onnxscript"],
        "viz": ["matplotlib", "scikit-image"],
        "onnx": ["onnx", "onnxruntime", "onnxscript"],
    },
    **cuda_extension_kwargs(),
)
