"""DefMamba model definitions."""
from ..variants import VARIANTS, VariantSpec
from .defmamba import DefMamba, DefMambaBackbone

__all__ = ["DefMamba", "DefMambaBackbone", "VARIANTS", "VariantSpec"]
