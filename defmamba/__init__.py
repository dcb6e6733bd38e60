"""DefMamba: Deformable Visual State Space Model (CVPR 2025).

Importing the package registers ``defmamba_tiny``, ``defmamba_small`` and ``defmamba_base``
with timm.
"""
from .models import DefMamba, DefMambaBackbone
from .models.registry import build_model
from .ops import selective_scan
from .version import __version__

__all__ = ["DefMamba", "DefMambaBackbone", "build_model", "selective_scan", "__version__"]
