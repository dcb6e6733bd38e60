"""The offset network's channel attention sigmoid(fc2(GELU(fc1(p)))): the op equals the official
``nn.Sequential`` of the checkpoints on CPU; its Triton kernels (forward, input and weight
gradients) against float64 on odd shapes (CPU: Triton's interpreter in a subprocess; GPU: compiled,
float32 and half-precision inputs, the model's widths); on the GPU under autocast against the plain
ops, and the whole model still agreeing with the reference formulations."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from triton_helpers import assert_cases_within, compiled_vs_eager, max_relative_errors, needs_triton_gpu, \
    run_under_interpreter

from defmamba.ops.channel_attention import channel_attention

# (images, channels, hidden): fewer images than a block, several blocks with a remainder (16 and 32
# per block), channels under, at and over the 64-channel tile; the model's widths (hidden = C / 16).
CASES = [(1, 40, 2), (3, 96, 6), (37, 130, 9), (33, 64, 17), (5, 200, 12)]
MODEL_CASES = [(128, 96, 6), (128, 384, 24), (64, 768, 48), (2, 1024, 64)]


def _layers(channels: int, hidden: int, dtype=torch.float64, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels), nn.Sigmoid()).to(dtype)


def _params(ca: nn.Sequential) -> tuple[torch.Tensor, ...]:
    return ca[0].weight, ca[0].bias, ca[2].weight, ca[2].bias


@pytest.mark.parametrize("batch,channels,hidden", [(3, 96, 6), (1, 40, 2)])
def test_equals_the_official_layers_on_cpu(batch, channels, hidden):
    ca = _layers(channels, hidden)
    pooled = torch.randn(batch, channels, dtype=torch.float64, requires_grad=True)
    got, expected = channel_attention(pooled, *_params(ca)), ca(pooled)
    assert torch.equal(got, expected)
    grad = torch.randn_like(expected)
    leaves = [pooled, *ca.parameters()]
    for g_got, g_expected in zip(torch.autograd.grad(got, leaves, grad), torch.autograd.grad(expected, leaves, grad)):
        assert torch.equal(g_got, g_expected)
    torch.autograd.gradcheck(channel_attention, (pooled, *_params(ca)))


def kernel_errors(case: tuple, dtype: torch.dtype, device: str, seed: int) -> dict:
    """Largest errors of the kernels' attention and gradients (pooled, fc1 weight and bias, fc2
    weight and bias) relative to the largest float64 entry, for inputs rounded to ``dtype``."""
    from defmamba.ops.channel_attention import channel_attention_triton

    batch, channels, hidden = case
    ca = _layers(channels, hidden, seed=seed)
    g = torch.Generator().manual_seed(seed)
    pooled64 = 2 * torch.randn(batch, channels, generator=g, dtype=torch.float64)
    grad64 = torch.randn(batch, channels, generator=g, dtype=torch.float64)
    inputs64 = [pooled64, *(p.detach() for p in _params(ca))]
    # the reference sees the inputs as rounded to dtype, so the error is the kernels' own
    reference_leaves = [t.to(dtype).double().requires_grad_() for t in inputs64]
    expected = channel_attention(*reference_leaves)
    expected_grads = torch.autograd.grad(expected, reference_leaves, grad64.to(dtype).double())
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in inputs64]
    got = channel_attention_triton(*leaves, dtype)
    got_grads = torch.autograd.grad(got, leaves, grad64.to(device=device, dtype=dtype))
    assert got.dtype == dtype and all(gg.dtype == dtype for gg in got_grads)
    names = ("attention", "d pooled", "d fc1 weight", "d fc1 bias", "d fc2 weight", "d fc2 bias")
    return max_relative_errors(names, [got, *got_grads], [expected.detach(), *expected_grads])


def compiled_matches_eager() -> float:
    """The custom-op route (taken under torch.compile) against the eager route, through the kernels."""
    from defmamba.ops import channel_attention as module

    module.use_kernels = lambda op, *tensors: True  # this subprocess runs under the interpreter
    g = torch.Generator().manual_seed(3)
    return compiled_vs_eager(module.channel_attention, *(torch.randn(*s, generator=g) for s in
                                                         [(5, 40), (3, 40), (3,), (40, 3), (40,)]))


def test_kernels_match_float64_in_interpreter():
    errors = run_under_interpreter(__file__)
    assert errors.pop("compiled vs eager") == 0.0  # the same kernels, through the custom op
    assert_cases_within(errors, 1e-5, cases=len(CASES))


@pytest.mark.cuda
@needs_triton_gpu
@pytest.mark.parametrize("case", CASES + MODEL_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernels_match_float64_gpu(case, dtype):
    """float32 within 1e-5 of the largest entry (float32 products of up to 1024 terms); half types
    within the rounding of the results (the inputs are already rounded)."""
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for name, err in kernel_errors(case, dtype, "cuda", seed=sum(case)).items():
        assert err <= tolerance, f"{name} off by {err:.2e} of its largest entry"


@pytest.mark.cuda
@needs_triton_gpu
@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16])
def test_under_autocast_matches_the_plain_ops_gpu(amp):
    """Under autocast with the layers' float32 parameters (the kernels' route): the attention and every
    gradient within the autocast dtype's rounding of the plain ops', in the same dtypes."""
    ca = _layers(384, 24, dtype=torch.float32, seed=4).cuda()
    pooled32 = torch.randn(128, 384, device="cuda", requires_grad=True)
    leaves = [pooled32, *ca.parameters()]
    with torch.autocast("cuda", dtype=amp):
        pooled = pooled32.to(amp)
        expected = ca(pooled)
        got = channel_attention(pooled, *_params(ca))
    assert got.dtype == expected.dtype == amp
    tolerance = {torch.float16: 4e-3, torch.bfloat16: 3e-2}[amp]
    grad = torch.randn_like(expected)
    got_grads = torch.autograd.grad(got, leaves, grad, retain_graph=True)
    expected_grads = torch.autograd.grad(expected, leaves, grad)
    for name, a, b in zip(("attention", "pooled", "w1", "b1", "w2", "b2"), [got, *got_grads], [expected, *expected_grads]):
        assert a.dtype == b.dtype, name
        err = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
        assert err <= tolerance, f"{name}: off by {err:.2e} of its largest entry"


if __name__ == "__main__":  # the interpreter check (run by the tests above in a subprocess)
    results = {str(case): kernel_errors(case, torch.float32, "cpu", seed=i) for i, case in enumerate(CASES)}
    results["compiled vs eager"] = compiled_matches_eager()
    print(json.dumps(results))
