"""Same function as the authors' code: outputs, token orders and gradients of the golden cases.

The fixtures (tests/fixtures/golden_mini_*.pt, slimmed by tools/make_golden_fixtures.py) were
computed by the official implementation in float64 on CPU with randomised weights.
"""
import pytest
import torch

from defmamba import DefMamba, DefMambaBackbone
from defmamba.models.dssm import DSSM

from conftest import FIXTURES


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def load_fixture(name: str) -> dict:
    return torch.load(FIXTURES / f"golden_mini_{name}.pt", weights_only=True)


def build(cls, data: dict, dtype: torch.dtype, **kwargs):
    model = cls(dims=32, depths=(1, 1, 1, 1), **kwargs).to(dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in data["state_dict"].items()}, strict=True)
    return model


def record_orders(model) -> dict:
    orders = {}
    for name, module in model.named_modules():
        if isinstance(module, DSSM):
            module.DS.register_forward_hook(lambda m, i, out, name=name: orders.__setitem__(f"{name}.DS", out.order))
    return orders


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_classifier_forward_matches_official(dtype, tol):
    data = load_fixture("fwd")
    model = build(DefMamba, data, dtype).eval()
    orders = record_orders(model)
    with torch.no_grad():
        logits = model(data["input"].to(dtype))
    assert rel_err(logits, data["output"]) <= tol
    assert orders.keys() == data["orders"].keys()
    for layer, expected in data["orders"].items():
        assert torch.equal(orders[layer], expected), f"token order differs in {layer}"


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_backbone_forward_matches_official(dtype, tol):
    data = load_fixture("backbone")
    model = build(DefMambaBackbone, data, dtype).eval()
    with torch.no_grad():
        features = model(data["input"].to(dtype))
    assert len(features) == len(data["output"]) == 4
    for got, expected in zip(features, data["output"]):
        assert got.shape == expected.shape
        assert rel_err(got, expected) <= tol


# Train-mode golden: the official code rounds the scan inputs to float32 while training, so a
# float64 run agrees to ~1e-8 in the logits and ~1e-6 in the most sensitive gradients.
@pytest.mark.parametrize("dtype,out_tol,grad_tol", [(torch.float64, 1e-7, 1e-6), (torch.float32, 1e-4, 1e-4)])
def test_gradients_match_official(dtype, out_tol, grad_tol):
    data = load_fixture("grad")
    model = build(DefMamba, data, dtype, drop_path_rate=0.0).train()
    x = data["input"].to(dtype).requires_grad_()
    logits = model(x)
    (logits * data["loss_weight"].to(dtype)).sum().backward()
    assert rel_err(logits, data["logits"]) <= out_tol
    assert rel_err(x.grad, data["grad_input"]) <= grad_tol
    params = dict(model.named_parameters())
    assert len(data["grad_params"]) > 100
    for name, expected in data["grad_params"].items():
        assert rel_err(params[name].grad, expected) <= grad_tol, name


def test_path_order_gradient_is_the_official_surrogate(monkeypatch):
    """Zeroing the path-position gradient must visibly change the offset-network gradients,
    so the comparison above really pins the custom backward down."""
    from defmamba.ops.deformable_sampling import reference

    data = load_fixture("grad")
    model = build(DefMamba, data, torch.float64, drop_path_rate=0.0).train()
    original = reference._PathOrder.backward

    def without_path_grad(ctx, grad_seq):
        grad_z, _, *rest = original(ctx, grad_seq)
        return grad_z, None, *rest

    monkeypatch.setattr(reference._PathOrder, "backward", staticmethod(without_path_grad))
    (model(data["input"].double()) * data["loss_weight"].double()).sum().backward()
    name = "layers.0.blocks.0.op.DS.conv_offset.conv1.weight"
    assert rel_err(dict(model.named_parameters())[name].grad, data["grad_params"][name]) > 1e-2


def gpu_backends() -> list[str]:
    from defmamba.ops.selective_scan import available_backends

    return available_backends("cuda") if torch.cuda.is_available() else ["torch"]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", gpu_backends())
def test_golden_cases_on_gpu_with_every_backend(backend, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # float32 convolutions, not TF32
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    fwd = load_fixture("fwd")
    model = build(DefMamba, fwd, torch.float32, scan_backend=backend).cuda().eval()
    with torch.no_grad():
        assert rel_err(model(fwd["input"].cuda()).cpu(), fwd["output"]) <= 1e-4

    data = load_fixture("grad")
    model = build(DefMamba, data, torch.float32, drop_path_rate=0.0, scan_backend=backend).cuda().train()
    x = data["input"].cuda().requires_grad_()
    logits = model(x)
    (logits * data["loss_weight"].cuda()).sum().backward()
    assert rel_err(logits.cpu(), data["logits"]) <= 1e-4
    assert rel_err(x.grad.cpu(), data["grad_input"]) <= 1e-4
    params = dict(model.named_parameters())
    for name, expected in data["grad_params"].items():
        assert rel_err(params[name].grad.cpu(), expected) <= 1e-4, name
