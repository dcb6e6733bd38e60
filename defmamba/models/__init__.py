"""DefMamba model definitions."""
from .defmamba import VARIANTS, DefMamba, DefMambaBackbone, VariantSpec

__all__ = ["DefMamba", "DefMambaBackbone", "VARIANTS", "VariantSpec"]
