"""Datasets and loaders: an ImageNet-layout folder, the embedded scikit-learn digits or synthetic images."""
from .build import DataBundle, build_loaders
from .errors import DataError

__all__ = ["DataBundle", "DataError", "build_loaders"]
