"""DefMamba in the OpenMMLab tools (mmdet, mmseg): the backbone wrapper, its checkpoint loading and
the shared train/test runner.

Importing this package registers ``MM_DefMamba`` in the installed task packages' ``MODELS``
registries; configs reach it with ``custom_imports=dict(imports=['defmamba.mm'])``. Modules:
``backbone`` (the wrapper), ``checkpoint`` (backbone weights, mmengine checkpoints read safely),
``runner`` (``detection/`` and ``segmentation/`` train and test, task FLOPs).
"""
from .backbone import MM_DefMamba
from .checkpoint import BackboneLoadReport, load_backbone_weights

__all__ = ["MM_DefMamba", "BackboneLoadReport", "load_backbone_weights"]
