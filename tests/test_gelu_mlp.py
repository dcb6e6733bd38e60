"""The MLP fc2(GELU(fc1(x))) with GELU recomputed in the backward: the same values and gradients as
the plain ops in float64 and under bfloat16 autocast (CPU), with and without biases, on odd shapes;
the Triton kernel of the hidden layer's gradient (GELU(h), h's gradient, its column sums) against
float64 (CPU: Triton's interpreter in a subprocess; GPU: compiled, on the model's hidden widths);
the whole MLP on the GPU under autocast against the plain ops."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from triton_helpers import assert_cases_within, compiled_vs_eager, max_relative_errors, needs_triton_gpu, \
    run_under_interpreter

from defmamba.ops.gelu_mlp import gelu_grad_and_column_sums, gelu_mlp


def _mlp_inputs(shape, hidden, out_features, bias, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)

    def rand(*size):
        return torch.randn(*size, generator=g, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()

    x = rand(*shape)
    w1, b1 = rand(hidden, shape[-1]), rand(hidden) if bias else None
    w2, b2 = rand(out_features, hidden), rand(out_features) if bias else None
    return x, w1, b1, w2, b2


def _plain(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


@pytest.mark.parametrize("shape,hidden,out_features,bias", [((3, 7), 9, 5, True), ((2, 5, 3, 12), 20, 7, False),
                                                            ((1, 9, 16), 33, 4, True)])
def test_matches_the_plain_ops_in_float64(shape, hidden, out_features, bias):
    inputs = _mlp_inputs(shape, hidden, out_features, bias)
    leaves = [t for t in inputs if t is not None]
    expected = _plain(*inputs)
    got = gelu_mlp(*inputs)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    grad_out = torch.randn_like(expected)
    for g_got, g_expected in zip(torch.autograd.grad(got, leaves, grad_out), torch.autograd.grad(expected, leaves, grad_out)):
        torch.testing.assert_close(g_got, g_expected, rtol=1e-13, atol=1e-13)
    torch.autograd.gradcheck(gelu_mlp, inputs)


def test_matches_the_plain_ops_under_bfloat16_autocast():
    inputs = _mlp_inputs((2, 6, 5, 24), 40, 10, True, dtype=torch.float32, seed=1)
    x32, *params = inputs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = (x32 * 1.0).to(torch.bfloat16)  # as the LayerNorm before the MLP hands it over under autocast
        expected = _plain(x, *params)
        got = gelu_mlp(x, *params)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    grad_out = torch.randn_like(expected)
    leaves = [x32, *params]
    got_grads = torch.autograd.grad(got, leaves, grad_out, retain_graph=True)  # x is shared
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)
    for g_got, g_expected in zip(got_grads, expected_grads):
        assert g_got.dtype == g_expected.dtype
        torch.testing.assert_close(g_got, g_expected, rtol=0, atol=0)  # the same ops in the same dtypes


def test_without_grad_runs_the_plain_ops():
    inputs = _mlp_inputs((4, 8), 12, 3, True)
    with torch.no_grad():
        assert torch.equal(gelu_mlp(*inputs), _plain(*inputs))


def test_gradient_inputs_must_match():
    with pytest.raises(ValueError, match="h and grad must match in shape, dtype and device"):
        gelu_grad_and_column_sums(torch.randn(4, 6), torch.randn(4, 6, dtype=torch.float64))


# (rows, columns) of the hidden layer's gradient: rows within one tile, over several 512-row programs
# (1100 = 2 · 512 + 76), columns below, at and over one 128-column tile.
GRAD_CASES = [(5, 7), (1100, 130), (40, 128), (3, 300)]


def grad_errors(case: tuple, dtype: torch.dtype, device: str, seed: int) -> dict:
    """Largest errors of the kernel's GELU(h), h's gradient and its column sums relative to the
    largest float64 entry (the sums against the sums of the rounded gradient, as the kernel sums)."""
    from defmamba.ops.gelu_mlp import gelu_grad_and_column_sums_triton

    rows, cols = case
    g = torch.Generator().manual_seed(seed)
    h = (3 * torch.randn(rows, cols, generator=g, dtype=torch.float64)).to(dtype)
    grad = torch.randn(rows, cols, generator=g, dtype=torch.float64).to(dtype)
    reference_grad_h = torch.ops.aten.gelu_backward(grad.double(), h.double())
    activation, grad_h, sums = gelu_grad_and_column_sums_triton(h.to(device), grad.to(device))
    assert activation.dtype == grad_h.dtype == dtype and sums.dtype == torch.float32
    return max_relative_errors(("gelu", "grad_h", "column sums"), [activation, grad_h, sums],
                               [F.gelu(h.double()), reference_grad_h, grad_h.double().cpu().sum(0)])


def compiled_matches_eager() -> float:
    """The custom-op route (taken under torch.compile) against the eager route: the whole MLP's output
    and gradients, the hidden layer's gradient through the Triton kernel."""
    from defmamba.ops import gelu_mlp as module

    def mlp_through_the_kernel(x, w1, b1, w2, b2):
        return module.gelu_mlp(x, w1, b1, w2, b2)

    module.use_kernels = lambda op, *tensors: True  # this subprocess runs under the interpreter
    g = torch.Generator().manual_seed(5)
    return compiled_vs_eager(mlp_through_the_kernel, *(torch.randn(*s, generator=g) for s in
                                                       [(2, 5, 6), (20, 6), (20,), (4, 20), (4,)]))


def test_kernel_matches_float64_in_interpreter():
    errors = run_under_interpreter(__file__)
    assert errors.pop("compiled vs eager") == 0.0  # the same kernel, through the custom op
    assert_cases_within(errors, 1e-6, cases=len(GRAD_CASES))


@pytest.mark.cuda
@needs_triton_gpu
@pytest.mark.parametrize("case", GRAD_CASES + [(6272, 384), (3136, 768), (1568, 1536), (392, 3072)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_matches_float64_gpu(case, dtype):
    """float32 within 1e-6 of the largest entry; half types within their rounding (the inputs are
    already rounded, so the error is the rounding of the results)."""
    tolerance = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    for name, err in grad_errors(case, dtype, "cuda", seed=sum(case)).items():
        assert err <= tolerance, f"{name} off by {err:.2e} of its largest entry"


@pytest.mark.cuda
@needs_triton_gpu
@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16])
def test_mlp_under_autocast_matches_the_plain_ops_gpu(amp):
    """The MLP on the GPU under autocast (the kernel's route) against the plain ops under the same
    autocast: output and every gradient within the autocast dtype's rounding, in the same dtypes."""
    inputs = _mlp_inputs((4, 14, 14, 96), 384, 96, True, dtype=torch.float32, seed=2, device="cuda")
    x32, *params = inputs
    leaves = [x32, *params]
    with torch.autocast("cuda", dtype=amp):
        x = (x32 * 1.0).to(amp)
        expected = _plain(x, *params)
        got = gelu_mlp(x, *params)
    assert got.dtype == expected.dtype == amp
    tolerance = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[amp]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # the forward runs the same ops
    grad_out = torch.randn_like(expected)
    got_grads = torch.autograd.grad(got, leaves, grad_out, retain_graph=True)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)
    for name, g_got, g_expected in zip(("x", "w1", "b1", "w2", "b2"), got_grads, expected_grads):
        assert g_got.dtype == g_expected.dtype, name
        err = ((g_got - g_expected).abs().max() / g_expected.abs().max()).item()
        assert err <= tolerance, f"{name}: off by {err:.2e} of its largest entry"


if __name__ == "__main__":  # the interpreter check (run by the tests above in a subprocess)
    results = {str(case): grad_errors(case, torch.float32, "cpu", seed=i) for i, case in enumerate(GRAD_CASES)}
    results["compiled vs eager"] = compiled_matches_eager()
    print(json.dumps(results))
