"""linear(GELU(h)) with GELU recomputed in the backward: the same values and gradients as the
plain ops, in float64 and under bfloat16 autocast, with and without bias, on odd shapes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from defmamba.ops.gelu_linear import gelu_linear


def _inputs(shape, out_features, bias, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(out_features, shape[-1], generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(out_features, generator=g, dtype=dtype, requires_grad=True) if bias else None
    return h, weight, b


@pytest.mark.parametrize("shape,out_features,bias", [((3, 7), 5, True), ((2, 5, 3, 12), 7, False), ((1, 9, 16), 4, True)])
def test_matches_the_plain_ops_in_float64(shape, out_features, bias):
    h, weight, b = _inputs(shape, out_features, bias)
    params = [t for t in (h, weight, b) if t is not None]
    expected = F.linear(F.gelu(h), weight, b)
    got = gelu_linear(h, weight, b)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    grad_out = torch.randn_like(expected)
    for g_got, g_expected in zip(torch.autograd.grad(got, params, grad_out), torch.autograd.grad(expected, params, grad_out)):
        torch.testing.assert_close(g_got, g_expected, rtol=1e-13, atol=1e-13)
    torch.autograd.gradcheck(gelu_linear, tuple(t for t in (h, weight, b)))


def test_matches_the_plain_ops_under_bfloat16_autocast():
    h32, weight, b = _inputs((2, 6, 5, 24), 10, True, dtype=torch.float32, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = (h32 * 1.0).to(torch.bfloat16)           # as fc1's output under autocast
        expected = F.linear(F.gelu(h), weight, b)
        got = gelu_linear(h, weight, b)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    grad_out = torch.randn_like(expected)
    params = [h32, weight, b]
    got_grads = torch.autograd.grad(got, params, grad_out, retain_graph=True)  # h is shared
    expected_grads = torch.autograd.grad(expected, params, grad_out)
    for g_got, g_expected in zip(got_grads, expected_grads):
        assert g_got.dtype == g_expected.dtype
        torch.testing.assert_close(g_got, g_expected, rtol=0, atol=0)   # the same ops in the same dtypes


def test_without_grad_runs_the_plain_ops():
    h, weight, b = _inputs((4, 8), 3, True)
    with torch.no_grad():
        assert torch.equal(gelu_linear(h, weight, b), F.linear(F.gelu(h), weight, b))
