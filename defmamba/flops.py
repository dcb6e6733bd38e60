"""Parameter and FLOP counts of DefMamba models, counted the way the paper counts them.

FLOPs are fvcore's: one multiply-add is one FLOP, traced with ``torch.jit`` on a single image,
with fvcore's default operator handles (conv, linear, einsum, layer_norm, adaptive_avg_pool2d,
upsample_bilinear2d, grid_sampler, ...) plus the paper's own rules:

* SiLU, negation, exp and flip are free (not counted, not reported as unsupported).
* The selective scan is one operator counted by a formula of its shapes
  (:func:`selective_scan_flops`), not by the elementwise ops of whatever backend runs it; while
  counting, a shape-only stand-in takes its place (:class:`SelectiveScan`).
* A mean over spatial positions is counted as the adaptive average pooling the paper's model
  computed it with (see :func:`_mean_flop_jit`).
* The per-scan projections, batched matmuls here, are counted as the einsums the paper's model
  computed them with (see :func:`_matmul_as_einsum_flop_jit`).

Counts are for one image. (The paper's model resized the position-bias table once per image of
the batch, ours once per batch; at batch 1 both are the one ``upsample_bilinear2d`` counted.)

Everything else fvcore has no handle for (GELU, elementwise mul/add, tanh, sigmoid, gather, the
path-ordering autograd function, ...) is not counted, as in the paper.

fvcore is imported only inside the functions that need it, so ``import defmamba`` does not.
"""
from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

__all__ = ["count_params", "count_flops", "selective_scan_flops", "countable_selective_scan", "flop_handles"]

# Report names of the operators the paper's breakdown lists, in its order.
OPERATORS = ("conv", "layer_norm", "linear", "adaptive_avg_pool2d", "grid_sampler", "upsample_bilinear2d",
             "einsum", "selective_scan")

# Operators the paper declares free of cost.
_FREE_OPS = ("aten::silu", "aten::silu_", "aten::neg", "aten::exp", "aten::flip")


def count_params(model: nn.Module) -> int:
    """Number of parameters of ``model`` (shared tensors once), trainable or not."""
    return sum(p.numel() for p in model.parameters())


def _einsum_macs(equation: str, shapes: Sequence[Sequence[int]]) -> float:
    """Multiply-adds of an einsum as fvcore (and the paper) derive them from numpy.

    ``np.einsum_path(..., optimize="optimal")`` prints an "Optimized FLOP count" in ``%.3e``
    format (4 significant digits); that printed number, halved and floored, is the count. The
    rounding is part of the convention, so the printed text is parsed rather than recomputed.
    """
    # Zero-stride views: einsum_path only looks at shapes, so nothing is allocated.
    operands = [np.broadcast_to(np.zeros((), dtype=np.float64), tuple(int(s) for s in shape)) for shape in shapes]
    report = np.einsum_path(equation, *operands, optimize="optimal")[1]
    for line in report.split("\n"):
        if "optimized flop" in line.lower():
            return float(np.floor(float(line.split(":")[-1]) / 2))
    raise RuntimeError(f"numpy's einsum_path report for {equation!r} has no 'Optimized FLOP count' line:\n{report}")


def selective_scan_flops(batch: int, channels: int, d_state: int, length: int) -> float:
    """FLOPs of one grouped selective scan of ``channels`` (= K·D) channels, as the paper counts it.

    The sum of:
    * the discretisation exp(Δ·A), counted as the einsum ``bdl,dn->bdln``;
    * the input term Δ·u·B, counted as the einsum ``bdl,bnl,bdl->bdln``;
    * per step, the state update (batch·channels·N) plus the readout ⟨C, h⟩, counted as the
      einsum ``bdn,bdn->bd``; all times L;
    * the skip term D·u and the gate by z: 2·batch·channels·L.

    Every einsum goes through :func:`_einsum_macs`, so numpy's 4-digit rounding applies to the
    readout too: it matters once batch·channels·N has 5 digits (stage 3 of Base), and the
    paper's totals are reproduced exactly only with it.
    """
    discretise = _einsum_macs("bdl,dn->bdln", [(batch, channels, length), (channels, d_state)])
    drive = _einsum_macs("bdl,bnl,bdl->bdln", [(batch, channels, length), (batch, d_state, length),
                                               (batch, channels, length)])
    readout = _einsum_macs("bdn,bdn->bd", [(batch, channels, d_state), (batch, channels, d_state)])
    recurrence_and_readout = length * (batch * channels * d_state + readout)
    skip_and_gate = 2 * batch * channels * length
    return discretise + drive + recurrence_and_readout + skip_and_gate


class SelectiveScan(torch.autograd.Function):
    """Stand-in for the selective scan while counting: one autograd function, so that a JIT trace
    shows the scan as a single ``prim::PythonOp.SelectiveScan`` node with the scan's inputs and
    output, and nothing of any backend's inner ops.

    It returns zeros of the scan's output shape and dtype instead of running a backend. The count
    is a function of the traced shapes only, and no shape in the model depends on the scan's
    values, while the reference scan on CPU would cost far more than the rest of the trace (at
    the detection input size, 800×1280, about 12 GB and minutes for one stage-0 scan of
    DefMamba-S). Model outputs
    computed while counting are therefore meaningless and are discarded.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, out_dtype):
        return torch.zeros(u.shape, dtype=out_dtype, device=u.device)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("SelectiveScan is a FLOP-counting stand-in and has no backward")


@contextlib.contextmanager
def countable_selective_scan() -> Iterator[None]:
    """Within this context, every DSSM calls :class:`SelectiveScan` instead of the selective scan.

    The DSSM module calls ``defmamba.models.dssm.selective_scan``; that name is rebound to the
    stand-in for the duration of the context and restored on exit (also after an error).
    """
    from .models import dssm

    original = dssm.selective_scan

    def stand_in(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, out_dtype=None, backend="auto",
                 A_is_log=False):
        if u.dim() != 3 or A.dim() != 2 or A.shape[0] != u.shape[1]:
            raise ValueError(f"selective scan needs u (batch, channels, L) and A (channels, N); got {tuple(u.shape)}, {tuple(A.shape)}")
        return SelectiveScan.apply(u, delta, A, B, C, D, delta_bias, u.dtype if out_dtype is None else out_dtype)

    dssm.selective_scan = stand_in
    try:
        yield
    finally:
        dssm.selective_scan = original


def _selective_scan_flop_jit(inputs: list, outputs: list) -> Counter:
    """fvcore handle of ``prim::PythonOp.SelectiveScan``: u is (batch, K·D, L), A is (K·D, N)."""
    from fvcore.nn.jit_handles import get_shape

    batch, channels, length = get_shape(inputs[0])
    d_state = get_shape(inputs[2])[1]
    return Counter({"selective_scan": selective_scan_flops(batch, channels, d_state, length)})


def _mean_flop_jit(inputs: list, outputs: list) -> Counter:
    """fvcore handle of ``aten::mean``: one FLOP per input element, reported as adaptive_avg_pool2d.

    The paper's model took the global average of the head and of the offset network's channel
    attention with ``adaptive_avg_pool2d``, which fvcore counts as one FLOP per input element;
    ours computes the same averages with ``mean``, which fvcore does not count. A mean is the same
    arithmetic, so it is counted by the same rule and under the same name.
    """
    from fvcore.nn.jit_handles import get_shape

    return Counter({"adaptive_avg_pool2d": float(np.prod(get_shape(inputs[0])))})


def _matmul_einsum_equation(a_dims: int, b_dims: int) -> str:
    """The einsum equivalent of ``torch.matmul`` of an a_dims-D by a b_dims-D tensor (both ≥ 2 dims),
    e.g. (3, 4) → "kcd,bkdl->bkcl" up to letter names for a 3-D by 4-D product."""
    batch = "abefghijpqrstuvw"
    n_batch = max(a_dims, b_dims) - 2
    out_batch = batch[:n_batch]
    a_batch, b_batch = out_batch[n_batch - (a_dims - 2):], out_batch[n_batch - (b_dims - 2):]
    return f"{a_batch}mk,{b_batch}kn->{out_batch}mn"


def _matmul_as_einsum_flop_jit(inputs: list, outputs: list) -> Counter:
    """fvcore handle of ``aten::matmul``, counted by the einsum rule and reported as einsum.

    The paper's model computed the per-scan projections x_proj and dt_projs with einsum, which
    fvcore counts through numpy's einsum_path (with its 4-digit rounding, :func:`_einsum_macs`);
    ours computes the same products as batched matmuls, the only matmuls in the model. The same
    arithmetic is counted by the same rule under the same name.
    """
    from fvcore.nn.jit_handles import get_shape

    a_shape, b_shape = get_shape(inputs[0]), get_shape(inputs[1])
    if len(a_shape) < 2 or len(b_shape) < 2:
        raise ValueError(f"matmul FLOPs are counted for operands of at least 2 dims; got {a_shape} and {b_shape}")
    equation = _matmul_einsum_equation(len(a_shape), len(b_shape))
    return Counter({"einsum": _einsum_macs(equation, [a_shape, b_shape])})


def flop_handles() -> dict[str, Optional[Callable[[list, list], Any]]]:
    """The paper's operator rules, as extra fvcore handles (``None`` marks a free operator).

    Use with :func:`countable_selective_scan` active while tracing, e.g.::

        with countable_selective_scan():
            FlopCountAnalysis(model, inputs).set_op_handle(**flop_handles()).total()
    """
    handles: dict[str, Optional[Callable[[list, list], Any]]] = {op: None for op in _FREE_OPS}
    handles["prim::PythonOp.SelectiveScan"] = _selective_scan_flop_jit
    handles["aten::mean"] = _mean_flop_jit
    handles["aten::matmul"] = _matmul_as_einsum_flop_jit
    return handles


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Evaluation mode for every submodule, each restored to its own previous mode on exit."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _check_input_size(input_size: Sequence[int]) -> tuple[int, int, int]:
    size = tuple(input_size)
    if len(size) != 3 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in size):
        raise ValueError(f"input_size must be (channels, height, width) of positive ints, e.g. (3, 224, 224); got {input_size!r}")
    return tuple(int(s) for s in size)


def count_flops(model: nn.Module, input_size: Sequence[int] = (3, 224, 224)) -> tuple[float, dict[str, float]]:
    """FLOPs of ``model`` on one image of ``input_size`` (C, H, W), counted as the paper does.

    Returns (total, breakdown): the total FLOPs and FLOPs per operator, named ``conv``,
    ``layer_norm``, ``linear``, ``adaptive_avg_pool2d``, ``grid_sampler``,
    ``upsample_bilinear2d``, ``einsum``, ``selective_scan`` (plus any other operator fvcore
    counts in the given model). The model is traced once in eval mode without gradients, on its
    own device and dtype, with the selective scan replaced by a shape-only stand-in
    (:class:`SelectiveScan`); its modes and scan are restored afterwards. Needs fvcore.
    """
    try:
        with warnings.catch_warnings():
            # fvcore scripts its focal losses on import, which recent torch reports as deprecated.
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
            from fvcore.nn import FlopCountAnalysis
    except ImportError as err:
        raise ImportError("counting FLOPs needs fvcore: pip install fvcore") from err

    size = _check_input_size(input_size)
    reference = next(model.parameters(), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
    generator = torch.Generator().manual_seed(0)
    image = torch.randn((1, *size), generator=generator).to(device=device, dtype=dtype)

    with _eval_mode(model), torch.no_grad(), countable_selective_scan():
        analysis = FlopCountAnalysis(model, (image,)).set_op_handle(**flop_handles())
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        by_operator = analysis.by_operator()

    breakdown = {op: float(by_operator.get(op, 0.0)) for op in OPERATORS}
    breakdown.update({op: float(flops) for op, flops in by_operator.items() if op not in breakdown})
    return float(sum(breakdown.values())), breakdown
