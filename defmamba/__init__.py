"""DefMamba: Deformable Visual State Space Model (CVPR 2025).

Importing the package registers ``defmamba_tiny``, ``defmamba_small`` and ``defmamba_base``
with timm.
"""
from .torch_version import check_torch_version

check_torch_version()  # before the imports below reach for APIs newer than the floor

from .models import DefMamba, DefMambaBackbone  # noqa: E402
from .models.registry import build_model  # noqa: E402
from .ops import selective_scan  # noqa: E402
from .version import __version__  # noqa: E402

__all__ = ["DefMamba", "DefMambaBackbone", "build_model", "selective_scan", "__version__"]
