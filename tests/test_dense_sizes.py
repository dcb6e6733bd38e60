"""The backbone at detection and segmentation sizes on the GPU: the kernels against the PyTorch
formulation, forward and backward, both in float32 and both measured against the PyTorch
formulation in float64.

At 800 × 1344 (an 800 × 1333 COCO image padded to 32) stage 1 is a 200 × 336 map: sequences of
67,200 tokens, beyond float16's range and far beyond the 224² maps of classification.

The deformable order sorts predicted path positions; runs that differ in rounding order
neighbouring tokens whose positions lie within an ulp of each other differently, and then compare
different models. So every run here takes the token order of the kernel run (recorded per
deformable layer, in call order), and the path positions themselves are compared separately.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import defmamba.ops.deformable_sampling.reference as sampling_reference
import defmamba.ops.deformable_sampling.triton as sampling_triton
from defmamba import DefMambaBackbone
from defmamba.ops import reference_only

pytestmark = pytest.mark.cuda

# Errors relative to the largest magnitude of the float64 tensor they belong to.
FORWARD_TOLERANCE = 1e-4
GRADIENT_TOLERANCE = 1e-3
PATH_TOLERANCE = 1e-4  # path positions lie in [-2, 2] (float32 resolution 2.4e-7); the offsets behind
# them carry the float32 error of every layer upstream


@contextlib.contextmanager
def _token_orders(recorded: list, replay: bool):
    """Record the order of every path sort, or replay recorded ones in call order."""
    original = sampling_reference.sort_path
    calls = iter(recorded)

    def sort_path(path):
        if replay:
            order = next(calls)
            assert order.shape == path.shape
            return order
        recorded.append(original(path))
        return recorded[-1]

    sampling_triton.sort_path = sampling_reference.sort_path = sort_path
    try:
        yield
    finally:
        sampling_triton.sort_path = sampling_reference.sort_path = original


def _forward_backward(model: torch.nn.Module, x: torch.Tensor, weights: list[torch.Tensor]) -> dict:
    """Features, path positions per deformable layer, and the gradients of a random projection of
    the features with respect to the input and every parameter."""
    paths = []
    handles = [m.register_forward_hook(lambda mod, i, out: paths.append(out.path.detach()))
               for m in model.modules() if type(m).__name__ == "DeformableLayer"]
    x = x.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    try:
        features = model(x)
    finally:
        for handle in handles:
            handle.remove()
    loss = sum((f * w.to(f.dtype)).sum() for f, w in zip(features, weights))
    loss.backward()
    grads = {"input": x.grad}
    grads.update({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    return dict(features=[f.detach() for f in features], paths=paths, grads=grads)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().max().item()
    return (got.double() - want).abs().max().item() / (scale if scale > 0 else 1.0)


@pytest.fixture
def full_float32():
    """cuDNN convolutions and cuBLAS matmuls in full float32 (PyTorch lets cuDNN use TF32 by default,
    whose 10-bit mantissa would put errors of ~5e-4 into the positions and features compared here)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("height,width", [(800, 1344), (517, 771)])
def test_kernels_match_the_pytorch_formulation_at_dense_sizes(height, width, full_float32):
    torch.manual_seed(0)
    # narrow (16 channels at stage 1): the sequence length is what is tested, and the PyTorch scan holds
    # every doubling pass for autograd (about 130 GiB in float32 at Small's widths and 800 × 1344)
    model = DefMambaBackbone(dims=16, depths=(1, 1, 1, 1), drop_path_rate=0.0).cuda().train()
    x = torch.randn(1, 3, height, width, device="cuda")
    with torch.no_grad():
        shapes = [f.shape for f in model(x)]
    assert shapes[0][-2:] == ((height + 3) // 4, (width + 3) // 4)
    weights = [torch.randn(s, device="cuda", dtype=torch.float64) for s in shapes]

    orders: list = []
    with _token_orders(orders, replay=False):
        fast = _forward_backward(model, x, weights)
    assert len(orders) == 4  # one deformable layer per block
    with _token_orders(orders, replay=True), reference_only():
        reference32 = _forward_backward(model, x, weights)
    with _token_orders(orders, replay=True), reference_only():
        exact = _forward_backward(model.double(), x.double(), weights)

    for i, (got, got32, want) in enumerate(zip(fast["paths"], reference32["paths"], exact["paths"])):
        err, err32 = ((t.double() - want).abs().max().item() for t in (got, got32))
        assert err <= PATH_TOLERANCE, f"path positions of layer {i}: kernels {err:.2e}, PyTorch float32 {err32:.2e}"
    failures = []
    for i, want in enumerate(exact["features"]):
        err, err32 = _relative_error(fast["features"][i], want), _relative_error(reference32["features"][i], want)
        if err > FORWARD_TOLERANCE:
            failures.append(f"features {i}: kernels {err:.2e}, PyTorch float32 {err32:.2e}")
    assert fast["grads"].keys() == exact["grads"].keys()
    for name, want in exact["grads"].items():
        err, err32 = _relative_error(fast["grads"][name], want), _relative_error(reference32["grads"][name], want)
        if err > GRADIENT_TOLERANCE:
            failures.append(f"gradient of {name}: kernels {err:.2e}, PyTorch float32 {err32:.2e}")
    assert not failures, f"at {height}×{width}, relative to float64:\n" + "\n".join(failures)
