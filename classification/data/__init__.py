"""Datasets and loaders: an ImageNet-layout folder or the embedded scikit-learn digits."""
from .build import DataBundle, build_loaders
from .errors import DataError

__all__ = ["DataBundle", "DataError", "build_loaders"]
