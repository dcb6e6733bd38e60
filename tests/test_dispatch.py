"""The one rule between an op's kernels and its PyTorch reference (defmamba.ops.dispatch): the
predicate, ``reference_only()`` and ``DEFMAMBA_KERNELS=0``, checked on the routing of every op.

On CPU the routes are taken with fake CUDA tensors (FakeTensorMode) and Triton faked available:
the kernel and reference entries are replaced by recorders, so only the choice is observed. On a
GPU the same choice is observed on real tensors, with the real entries running behind the recorders.
"""
from __future__ import annotations

import importlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from triton_helpers import needs_triton_gpu

from defmamba.ops import (channel_attention, deformable_sampling, depthwise_conv, dispatch, drop_path, gelu_mlp,
                          layer_norm, reference_only, scan_orders, time_step_projection)

scan = importlib.import_module("defmamba.ops.selective_scan")  # the package (its name in defmamba.ops is the function)


def _sample(device):
    x = torch.randn(2, 3, 4, 5, device=device)
    points = torch.rand(2, 4, 5, 2, device=device) * 2 - 1
    path = torch.rand(2, 20, device=device)
    return deformable_sampling.sample_in_path_order(x, points, torch.randn(3, 4, 5, device=device), points, path)


def _positions(device):
    offsets = torch.randn(2, 3, 4, 5, device=device)
    return deformable_sampling.sample_positions(offsets, torch.rand(2, device=device), torch.rand(4, 5, 2, device=device),
                                                torch.rand(4, 5, 2, device=device), torch.rand(20, device=device))


def _attention(device):
    return channel_attention.channel_attention(torch.randn(3, 32, device=device), torch.randn(2, 32, device=device),
                                               torch.randn(2, device=device), torch.randn(32, 2, device=device),
                                               torch.randn(32, device=device))


def _drop(device):
    return drop_path.add_dropped_path(torch.randn(4, 3, 5, device=device), torch.randn(4, 3, 5, device=device), 0.5)


def _conv(device):
    x = torch.randn(2, 6, 5, 7, device=device).contiguous(memory_format=torch.channels_last)
    return depthwise_conv.depthwise_conv2d(x, torch.randn(6, 1, 3, 3, device=device), torch.randn(6, device=device))


def _norm(device):
    return layer_norm.layer_norm(torch.randn(3, 8, device=device), (8,), torch.randn(8, device=device),
                                 torch.randn(8, device=device))


def _stack(device):
    x_map = torch.randn(2, 6, 3, 4, device=device).contiguous(memory_format=torch.channels_last)
    return scan_orders.stack_scan_orders(x_map, torch.randn(2, 12, 6, device=device))


def _merge(device):
    order = torch.stack([torch.randperm(12, device=device) for _ in range(2)])
    inverse = torch.argsort(order, dim=1)
    return scan_orders.merge_and_gate(torch.randn(2, 3, 6, 12, device=device), order, inverse,
                                      torch.randn(2, 3, 4, 6, device=device))


def _gelu_grad(device):
    return gelu_mlp.gelu_grad_and_column_sums(torch.randn(5, 16, device=device), torch.randn(5, 16, device=device))


def _projection(device):
    return time_step_projection.project_time_steps(torch.randn(3, 8, 2, device=device),
                                                   torch.randn(2, 3, 2, 10, device=device))


# op name, its package, the kernel and the reference entry the package routes to, a call with tensors on `device`
ROUTES = [
    ("channel_attention", channel_attention, "channel_attention_triton", "channel_attention_reference", _attention),
    ("deformable_sampling", deformable_sampling, "sample_in_path_order_triton", "sample_in_path_order_reference",
     _sample),
    ("deformable_sampling", deformable_sampling, "sample_positions_triton", "sample_positions_reference", _positions),
    ("depthwise_conv", depthwise_conv, "depthwise_conv2d_triton", "depthwise_conv2d_reference", _conv),
    ("drop_path", drop_path, "add_dropped_path_triton", "add_dropped_path_reference", _drop),
    ("layer_norm", layer_norm, "layer_norm_triton", "layer_norm_reference", _norm),
    ("scan_orders", scan_orders, "stack_scan_orders_triton", "stack_scan_orders_reference", _stack),
    ("scan_orders", scan_orders, "merge_and_gate_triton", "merge_and_gate_reference", _merge),
    ("gelu_mlp", gelu_mlp, "gelu_grad_and_column_sums_triton", "gelu_grad_and_column_sums_reference", _gelu_grad),
    ("time_step_projection", time_step_projection, "project_time_steps_triton", "project_time_steps_reference",
     _projection),
]
ROUTE_IDS = [call.__name__.strip("_") for *_, call in ROUTES]


def _record_routes(monkeypatch, package, kernel: str, reference: str, call_through: bool) -> list[str]:
    """Replace the package's two entries by recorders (calling the real entries if ``call_through``)."""
    taken = []
    for route, name in (("kernels", kernel), ("reference", reference)):
        entry = getattr(package, name)

        def recorder(*args, _route=route, _entry=entry, **kwargs):
            taken.append(_route)
            return _entry(*args, **kwargs) if call_through else None

        monkeypatch.setattr(package, name, recorder)
    return taken


def _route_on_fake_cuda(monkeypatch, route) -> list[str]:
    _, package, kernel, reference, call = route
    taken = _record_routes(monkeypatch, package, kernel, reference, call_through=False)
    with FakeTensorMode():
        call("cuda")
    return taken


@pytest.fixture
def kernels_available(monkeypatch):
    """Triton counted as usable, as on a GPU machine."""
    monkeypatch.setattr(dispatch, "_kernels_ready", True)


@pytest.mark.usefixtures("kernels_available")
@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
def test_kernels_are_taken_for_cuda_tensors_and_the_reference_inside_reference_only(monkeypatch, route):
    op = route[0]
    assert _route_on_fake_cuda(monkeypatch, route) == ["kernels"]
    with reference_only():
        assert _route_on_fake_cuda(monkeypatch, route) == ["reference"]
    with reference_only(op):
        assert _route_on_fake_cuda(monkeypatch, route) == ["reference"]
    other = next(name for name in dispatch.OPS if name != op)
    with reference_only(other):
        assert _route_on_fake_cuda(monkeypatch, route) == ["kernels"]
    assert _route_on_fake_cuda(monkeypatch, route) == ["kernels"]


@pytest.mark.usefixtures("kernels_available")
@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
def test_cpu_tensors_take_the_reference(monkeypatch, route):
    _, package, kernel, reference, call = route
    taken = _record_routes(monkeypatch, package, kernel, reference, call_through=False)
    call("cpu")
    assert taken == ["reference"]


@pytest.fixture
def kernels_variable(monkeypatch):
    """Set DEFMAMBA_KERNELS and re-import the dispatch module (which reads it at import)."""

    def set_value(value: str) -> None:
        monkeypatch.setenv(dispatch.ENV_VAR, value)
        importlib.reload(dispatch)
        monkeypatch.setattr(dispatch, "_kernels_ready", True)

    yield set_value
    monkeypatch.undo()
    importlib.reload(dispatch)


def test_environment_variable_forces_every_reference(monkeypatch, kernels_variable):
    kernels_variable("0")
    for route in ROUTES:
        assert _route_on_fake_cuda(monkeypatch, route) == ["reference"], route[0]
    assert scan.resolve_backend("auto", torch.device("cuda"))[0] == "torch"
    kernels_variable("1")
    for route in ROUTES:
        assert _route_on_fake_cuda(monkeypatch, route) == ["kernels"], route[0]


def test_environment_variable_names_the_ops_to_force(monkeypatch, kernels_variable):
    monkeypatch.setenv(dispatch.REFERENCE_OPS_VAR, "layer_norm, depthwise_conv")
    kernels_variable("")
    assert dispatch.reference_forced("layer_norm") and dispatch.reference_forced("depthwise_conv")
    for route in ROUTES:
        expected = "reference" if route[0] in ("layer_norm", "depthwise_conv") else "kernels"
        assert _route_on_fake_cuda(monkeypatch, route) == [expected], route[0]
    assert not dispatch.reference_forced("selective_scan")
    monkeypatch.setenv(dispatch.REFERENCE_OPS_VAR, "layer_norm,layernorm")
    with pytest.raises(ValueError, match="DEFMAMBA_REFERENCE_OPS names unknown op 'layernorm'; give a comma"):
        dispatch._reference_from_environment()


def test_selective_scan_auto_resolves_to_torch_when_forced(monkeypatch):
    """"auto" takes the first available GPU backend, unless the references are forced; a backend
    named explicitly is used as asked."""
    def kernel(*args):
        raise AssertionError("not called here")

    monkeypatch.setitem(scan._loaded, "cuda", (None, "not built here"))
    monkeypatch.setitem(scan._loaded, "triton", (kernel, ""))
    cuda = torch.device("cuda")
    assert scan.resolve_backend("auto", cuda) == ("triton", kernel)
    with reference_only("selective_scan"):
        assert scan.resolve_backend("auto", cuda)[0] == "torch"
        assert scan.resolve_backend("triton", cuda) == ("triton", kernel)
    with reference_only("layer_norm"):
        assert scan.resolve_backend("auto", cuda)[0] == "triton"


def test_bad_names_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown op 'layernorm'; the ops are 'channel_attention', 'deformable_sampling'"):
        with reference_only("layernorm"):
            pass
    monkeypatch.setenv(dispatch.ENV_VAR, "off")
    with pytest.raises(ValueError, match="DEFMAMBA_KERNELS='off' is not understood: set DEFMAMBA_KERNELS=0"):
        dispatch._reference_from_environment()


@pytest.mark.usefixtures("kernels_available")
def test_predicate_rules():
    """Only non-empty float32/float16/bfloat16 CUDA tensors qualify; None entries are skipped."""
    with FakeTensorMode():
        x = torch.empty(2, 3, device="cuda")
        assert dispatch.use_kernels("layer_norm", x, None, x.half(), x.bfloat16())
        assert not dispatch.use_kernels("layer_norm", x, x.double())
        assert not dispatch.use_kernels("layer_norm", x, torch.empty(0, 3, device="cuda"))
        assert not dispatch.use_kernels("layer_norm", x, torch.empty(2, 3))


@pytest.mark.usefixtures("kernels_available")
def test_no_kernels_while_tracing():
    """fvcore's FLOP count and ONNX export trace the model: they must get the PyTorch formulations
    even where the kernels could run."""
    with FakeTensorMode():
        x = torch.empty(3, device="cuda")
    assert dispatch.use_kernels("layer_norm", x)
    seen = []

    def probe(t):
        seen.append(dispatch.use_kernels("layer_norm", x))
        return t * 2

    torch.jit.trace(probe, torch.ones(3), check_trace=False)
    assert seen == [False]
    assert dispatch.use_kernels("layer_norm", x)


@pytest.mark.cuda
@needs_triton_gpu
@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
def test_routes_on_the_gpu(monkeypatch, route):
    """On a GPU, without fakes: the kernels run for CUDA tensors, the reference inside reference_only()."""
    op, package, kernel, reference, call = route
    taken = _record_routes(monkeypatch, package, kernel, reference, call_through=True)
    call("cuda")
    with reference_only(op):
        call("cuda")
    assert taken == ["kernels", "reference"]
