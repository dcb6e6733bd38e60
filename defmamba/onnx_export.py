"""Export DefMamba to ONNX and check the exported graph against PyTorch with ONNX Runtime.

The model is exported in eval mode with the pure-PyTorch selective scan (``scan_backend="torch"``),
whose recursive-doubling loop unrolls into plain ONNX ops (``GridSample`` needs opset ≥ 16).
Two PyTorch exporters work: the TorchScript-based one (``exporter="torchscript"``, the default:
it exports a small model in seconds) and the ``torch.export``-based one (``exporter="dynamo"``,
several times slower to export, the one PyTorch keeps developing). Both give the same graph
semantics and the same accuracy.

The deformable scan orders tokens with a *stable* ``argsort``. Neither exporter translates the
stable sort overload, so :func:`export_onnx` supplies the translation for the duration of the
export: ONNX ``TopK`` over the whole axis, ascending and sorted, which breaks ties by the lower
index (ONNX operator spec) — exactly a stable ascending sort.

Shapes: the batch dimension can be dynamic. Height and width cannot: the reference grid and the
offset scale of every deformable layer, and the number of doubling passes of the scan
(⌈log₂ h·w⌉), are computed from the feature-map size in Python and become constants of the
graph. Export one model per input size instead.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Iterator, Union

import numpy as np
import torch
import torch.nn as nn

__all__ = ["OPSET", "EXPORTERS", "OnnxCheck", "export_onnx", "check_onnx", "onnx_scan_model"]

OPSET = {"torchscript": 17, "dynamo": 18}  # each exporter's own opset; GridSample needs >= 16
INPUT_NAME = "image"
OUTPUT_NAME = "output"
_SYMBOLIC = "aten::argsort"
EXPORTERS = ("torchscript", "dynamo")


def _argsort_symbolic(g, self, *args):
    """argsort(self, dim, descending) or argsort.stable(self, stable, dim, descending) → TopK indices."""
    from torch.onnx import symbolic_helper

    dim = symbolic_helper._get_const(args[-2], "i", "dim")
    descending = symbolic_helper._get_const(args[-1], "b", "descending")
    size = g.op("Gather", g.op("Shape", self), g.op("Constant", value_t=torch.tensor([dim], dtype=torch.int64)), axis_i=0)
    _, indices = g.op("TopK", self, size, axis_i=dim, largest_i=int(descending), sorted_i=1, outputs=2)
    return indices


@contextlib.contextmanager
def _stable_argsort_symbolic() -> Iterator[None]:
    """Register the TopK translation of argsort for one export, then remove it again."""
    torch.onnx.register_custom_op_symbolic(_SYMBOLIC, _argsort_symbolic, OPSET["torchscript"])
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic(_SYMBOLIC, OPSET["torchscript"])


def _sort_stable_onnxscript(self, stable=None, dim: int = -1, descending: bool = False):
    """aten.sort.stable for the dynamo exporter: (values, indices) of TopK over the whole axis."""
    from onnxscript import opset18 as op

    size = op.Reshape(op.Gather(op.Shape(self), dim, axis=0), op.Constant(value_ints=[1]))
    return op.TopK(self, size, axis=dim, largest=descending, sorted=True)


def onnx_scan_model(model: nn.Module) -> nn.Module:
    """Switch every DSSM of ``model`` to the pure-PyTorch scan (the one ONNX can express) and to eval mode."""
    for module in model.modules():
        if hasattr(module, "scan_backend"):
            module.scan_backend = "torch"
    return model.eval()


def export_onnx(model: nn.Module, path: Union[str, os.PathLike], height: int = 224, width: int = 224,
                batch_size: int = 1, dynamic_batch: bool = True, exporter: str = "torchscript") -> torch.Tensor:
    """Export ``model`` (switched to eval mode and the torch scan) to ``path`` for (B, 3, height, width) inputs.

    Args:
        exporter: "torchscript" (fast) or "dynamo" (``torch.export``-based); see the module docstring.

    Returns the example input the graph was traced with (random, on the model's device).
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; choose one of {EXPORTERS}")
    try:
        import onnx  # noqa: F401  (both exporters serialise through it)
    except ImportError as err:
        raise ImportError("ONNX export needs the onnx package: pip install onnx onnxruntime onnxscript") from err
    model = onnx_scan_model(model)
    device = next(model.parameters()).device
    example = torch.randn(batch_size, 3, height, width, device=device)
    names = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=OPSET[exporter])
    with torch.no_grad(), warnings.catch_warnings():
        if exporter == "dynamo":
            dynamic_shapes = {"x": {0: torch.export.Dim("batch", min=1, max=4096)}} if dynamic_batch else None
            torch.onnx.export(model, (example,), os.fspath(path), dynamo=True, dynamic_shapes=dynamic_shapes,
                              custom_translation_table={torch.ops.aten.sort.stable: _sort_stable_onnxscript},
                              verbose=False, **names)
        else:
            # The tracer warns about every size it turns into a constant (the documented fixed H×W), and
            # PyTorch flags this exporter as legacy; the choice is deliberate (see the module docstring).
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            dynamic_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
            with _stable_argsort_symbolic():
                torch.onnx.export(model, (example,), os.fspath(path), dynamo=False, dynamic_axes=dynamic_axes, **names)
    return example


@dataclass
class OnnxCheck:
    """ONNX Runtime vs PyTorch on one input: max |difference|, and that divided by max |PyTorch output|."""

    batch_size: int
    max_abs_diff: float
    max_rel_diff: float


def check_onnx(model: nn.Module, path: Union[str, os.PathLike], inputs: torch.Tensor) -> OnnxCheck:
    """Validate the graph at ``path`` with onnx.checker, run it with ONNX Runtime on ``inputs``
    and compare with ``model`` (eval mode) on the same inputs."""
    import onnx
    import onnxruntime

    onnx.checker.check_model(onnx.load(os.fspath(path)), full_check=True)
    session = onnxruntime.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        reference = model.eval()(inputs).float().cpu().numpy()
    result = session.run([OUTPUT_NAME], {INPUT_NAME: inputs.float().cpu().numpy()})[0]
    if result.shape != reference.shape:
        raise RuntimeError(f"ONNX output has shape {result.shape}, PyTorch {reference.shape}")
    diff = float(np.abs(result - reference).max())
    scale = float(np.abs(reference).max())
    return OnnxCheck(inputs.shape[0], diff, diff / scale if scale > 0 else diff)
