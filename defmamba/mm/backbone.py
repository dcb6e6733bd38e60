"""DefMamba as an mmdet / mmseg backbone.

Importing this module registers :class:`MM_DefMamba` in the ``MODELS`` registry of
every installed OpenMMLab task package (mmdet, mmseg). Configs reach it with
``custom_imports=dict(imports=['defmamba.mm'])`` and ``backbone=dict(type='MM_DefMamba', ...)``.

The wrapper is the library's :class:`~defmamba.DefMambaBackbone` itself (a subclass,
so its state-dict keys are the authors' backbone keys unchanged) plus what the
OpenMMLab runners expect: ``init_cfg``/``pretrained`` loading of classification
checkpoints with a report, ``frozen_stages`` and an ``init_weights`` method.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

from torch import nn

from ..models import DefMambaBackbone
from ..variants import VARIANTS

__all__ = ["MM_DefMamba", "architecture", "pretrained_init_cfg"]

_REGISTRIES = []
try:
    from mmdet.registry import MODELS as _MMDET_MODELS

    _REGISTRIES.append(_MMDET_MODELS)
except ImportError:
    pass
try:
    from mmseg.registry import MODELS as _MMSEG_MODELS

    _REGISTRIES.append(_MMSEG_MODELS)
except ImportError:
    pass
if not _REGISTRIES:
    raise ImportError("defmamba.mm needs mmdet and/or mmsegmentation; install the optional "
                      "OpenMMLab stack with `bash tools/install_mm.sh` (or `make mm`)")

from mmengine.logging import print_log  # noqa: E402  (mmengine comes with mmdet/mmseg)

from .checkpoint import BackboneLoadReport, load_backbone_weights  # noqa: E402


_INIT_CFG_FORM = "dict(type='Pretrained', checkpoint=PATH[, key='auto'|'model'|'model_ema'])"


def pretrained_init_cfg(pretrained: Optional[str], init_cfg: Optional[Mapping]) -> Optional[dict]:
    """The backbone's ``init_cfg`` from its ``pretrained`` and ``init_cfg`` arguments.

    ``pretrained=PATH`` (the VMamba-family argument; ``--cfg-options model.backbone.pretrained=PATH``)
    names the checkpoint: alone it stands for ``dict(type='Pretrained', checkpoint=PATH)``; beside a
    Pretrained ``init_cfg`` (our configs carry one naming the default file) it replaces that
    checkpoint and keeps the other entries (``key``). An ``init_cfg`` of another kind next to
    ``pretrained`` contradicts it and is an error, as is any ``init_cfg`` but None or a Pretrained one.
    """
    if pretrained is not None and not isinstance(pretrained, str):
        raise ValueError(f"MM_DefMamba pretrained must be the path or URL of a checkpoint (or None), got {pretrained!r}")
    if init_cfg is not None and not isinstance(init_cfg, Mapping):
        raise ValueError(f"MM_DefMamba init_cfg must be None or {_INIT_CFG_FORM}, got {init_cfg!r}. --cfg-options "
                         "cannot write a dict in braces: set its entries one by one, e.g. "
                         "model.backbone.init_cfg.key=model_ema")
    if pretrained is not None:
        kind = (init_cfg or {}).get("type", "Pretrained")
        if kind != "Pretrained":
            raise ValueError(f"MM_DefMamba got pretrained={pretrained!r} and init_cfg={dict(init_cfg)!r}, which "
                             "disagree: pretrained loads a checkpoint; drop one of them")
        replaced = (init_cfg or {}).get("checkpoint")
        if replaced and replaced != pretrained:
            print_log(f"MM_DefMamba: pretrained={pretrained!r} replaces init_cfg's checkpoint {replaced!r}",
                      logger="current")
        init_cfg = {**(init_cfg or {}), "type": "Pretrained", "checkpoint": pretrained}
    if init_cfg is None:
        return None
    if init_cfg.get("type") != "Pretrained" or not init_cfg.get("checkpoint"):
        raise ValueError(f"MM_DefMamba init_cfg must be None or {_INIT_CFG_FORM}, got {dict(init_cfg)!r}; "
                         "the backbone initialises its own weights otherwise")
    return dict(init_cfg)


def architecture(arch: Optional[str], dims: Union[int, Sequence[int], None],
                 depths: Optional[Sequence[int]]) -> tuple[Union[int, Sequence[int]], Sequence[int]]:
    """Widths and depths of the backbone: those of the published variant ``arch`` ('tiny', 'small',
    'base', or 'defmamba_tiny' …; :data:`defmamba.variants.VARIANTS`), or ``dims`` and ``depths``
    for ``arch=None``. Giving both is an error: a variant name fixes its widths and depths."""
    if arch is None:
        if dims is None or depths is None:
            raise ValueError("MM_DefMamba with arch=None needs both dims and depths; or name a published "
                             f"variant: arch in {sorted(VARIANTS)}")
        return dims, depths
    if not isinstance(arch, str) or arch.lower().removeprefix("defmamba_") not in VARIANTS:
        raise ValueError(f"MM_DefMamba arch must be one of {sorted(VARIANTS)} (or 'defmamba_<name>'), or None "
                         f"with dims and depths; got {arch!r}")
    if dims is not None or depths is not None:
        raise ValueError(f"MM_DefMamba got arch={arch!r} and dims={dims!r}, depths={depths!r}: the variant fixes "
                         "both; set arch=None to give your own dims and depths, or drop them")
    spec = VARIANTS[arch.lower().removeprefix("defmamba_")]
    return spec.dims, spec.depths


class MM_DefMamba(DefMambaBackbone):  # noqa: N801  (OpenMMLab registry naming)
    """DefMamba backbone for mmdet/mmseg detectors and segmentors.

    Args:
        arch: the published variant ('tiny', 'small', 'base'), whose widths and depths the backbone
            takes (see :func:`architecture`); None for a custom one given by ``dims`` and ``depths``.
        dims, depths: a custom architecture (with ``arch=None`` only), as :class:`~defmamba.DefMambaBackbone`.
        drop_path_rate, d_state, mlp_ratio, in_chans, use_checkpoint, out_indices:
            as :class:`~defmamba.DefMambaBackbone`; the drop-path rate is a fine-tuning choice of
            each task's config, not part of the variant.
        frozen_stages: -1 trains everything; k ≥ 0 freezes the patch embedding and, for k ≥ 1,
            stages ``0 .. k-1`` with their ``outnorm``s (kept in eval mode and without gradients).
        pretrained: path or URL of a checkpoint to load in :meth:`init_weights`: the checkpoint of
            the Pretrained ``init_cfg`` (see :func:`pretrained_init_cfg`).
        init_cfg: ``None`` or ``dict(type='Pretrained', checkpoint=PATH, [key='auto'|'model'|'model_ema'])``.
        allow_pickle: load a trusted checkpoint that carries classes outside the safe allowlist.
        graphed_training: replay the backbone's training forward and backward from CUDA graphs
            (:meth:`~defmamba.DefMambaBackbone.set_graphed_training`), to take the backbone's
            per-kernel host cost out of iterations on fixed crop sizes (UperNet's; its speed is not
            measured yet); detection's varying image sizes gain little (the first two shapes are
            recorded, the others run eagerly).
    """

    def __init__(self, arch: Optional[str] = "small", dims: Union[int, Sequence[int], None] = None,
                 depths: Optional[Sequence[int]] = None, out_indices: Sequence[int] = (0, 1, 2, 3),
                 drop_path_rate: float = 0.2, d_state: int = 16,
                 mlp_ratio: float = 4.0, in_chans: int = 3, use_checkpoint: bool = False, frozen_stages: int = -1,
                 pretrained: Optional[str] = None, init_cfg: Optional[dict] = None, allow_pickle: bool = False,
                 graphed_training: bool = False) -> None:
        dims, depths = architecture(arch, dims, depths)
        super().__init__(dims=dims, depths=depths, out_indices=out_indices, drop_path_rate=drop_path_rate,
                         d_state=d_state, mlp_ratio=mlp_ratio, in_chans=in_chans, use_checkpoint=use_checkpoint)
        init_cfg = pretrained_init_cfg(pretrained, init_cfg)
        if not -1 <= frozen_stages <= len(self.layers):
            raise ValueError(f"frozen_stages must be in [-1, {len(self.layers)}], got {frozen_stages}")
        self.init_cfg = init_cfg
        self.frozen_stages = frozen_stages
        self.allow_pickle = allow_pickle
        self.load_report: Optional[BackboneLoadReport] = None
        self._freeze_stages()
        if graphed_training:
            self.set_graphed_training()

    def init_weights(self) -> None:
        """Load ``init_cfg``'s checkpoint (called by the OpenMMLab runner) and log what was loaded."""
        if self.init_cfg is None:
            return
        self.load_report = load_backbone_weights(self, self.init_cfg["checkpoint"], key=self.init_cfg.get("key", "auto"),
                                                 allow_pickle=self.allow_pickle)
        print_log(self.load_report.summary(), logger="current")
        self._freeze_stages()

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        modules: list[nn.Module] = [self.patch_embed]
        for i in range(self.frozen_stages):
            modules.append(self.layers[i])
            if hasattr(self, f"outnorm{i}"):
                modules.append(getattr(self, f"outnorm{i}"))
        return modules

    def _freeze_stages(self) -> None:
        for module in self._frozen_modules():
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> "MM_DefMamba":
        """Switch mode, keeping frozen stages in eval mode."""
        super().train(mode)
        self._freeze_stages()
        return self


for _registry in _REGISTRIES:
    _registry.register_module(name="MM_DefMamba", module=MM_DefMamba, force=True)
