"""Numerical operators used by the models: each a PyTorch reference formulation and kernels for
CUDA tensors; ``reference_only()`` / ``DEFMAMBA_KERNELS=0`` force the references (``dispatch.py``)."""
from .dispatch import reference_only
from .selective_scan import selective_scan

__all__ = ["reference_only", "selective_scan"]
