"""The time-step projection Δ = W_k · dt: the Triton kernel against torch.matmul in float64, values
and gradients, on ranks below and above the 16-wide dot and row lengths of every alignment (CPU:
Triton's interpreter in a subprocess; GPU: compiled, on the model's own shapes), plus the
dispatch off the GPU, autocast's rule and the shape check."""
from __future__ import annotations

import json

import pytest
import torch
from triton_helpers import assert_cases_within, compiled_vs_eager, max_relative_errors, needs_triton_gpu, \
    run_under_interpreter

from defmamba.ops.time_step_projection import project_time_steps

# (batch, scans, channels, rank, length): ranks 3, 6, 24, 48 (one and several 16-wide steps),
# channels below and above a 32/64-channel tile, L = 50, 36, 16, 7 (aligned by 2, 4, 8, 1), 130
# (more than one 128-token tile).
CASES = [(2, 3, 40, 6, 50), (1, 3, 70, 24, 36), (2, 2, 17, 3, 16), (3, 3, 33, 48, 7), (1, 2, 20, 6, 130)]


def max_errors(case: tuple, dtype: torch.dtype, device: str, seed: int, layout: str = "contiguous") -> dict:
    """Largest errors of the kernel's output and gradients relative to the largest float64 entry.
    ``layout`` of dt: "contiguous"; "view", read in place as the first R of R + 35 rows per (image,
    scan) of a wider tensor, as the DSSM passes the x_proj output's time-step rows; "padded rows",
    the first L of L + 3 columns, which the kernel cannot read in place (copied first)."""
    from defmamba.ops.time_step_projection import project_time_steps_triton
    from defmamba.ops.time_step_projection.triton import _rows_in_place

    batch, scans, channels, rank, length = case
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(scans, channels, rank, generator=g, dtype=torch.float64).to(dtype).double()
    dt = torch.randn(batch, scans, rank, length, generator=g, dtype=torch.float64).to(dtype).double()
    grad = torch.randn(batch, scans, channels, length, generator=g, dtype=torch.float64)
    ref_leaves = [t.clone().requires_grad_() for t in (weight, dt)]
    torch.matmul(*ref_leaves).backward(grad)
    reference = [torch.matmul(weight, dt)] + [t.grad for t in ref_leaves]
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in (weight, dt)]
    dt_in = leaves[1]
    if layout == "view":  # the rows in place among others (filled with values that would show if read)
        wide = torch.cat([leaves[1], torch.full_like(leaves[1][:, :, :1], 1e4).expand(-1, -1, 35, -1)], dim=2)
        dt_in = wide[:, :, :rank]
        assert not dt_in.is_contiguous() and _rows_in_place(dt_in) is dt_in
    elif layout == "padded rows":
        wide = torch.cat([leaves[1], torch.full_like(leaves[1][..., :1], 1e4).expand(-1, -1, -1, 3)], dim=3)
        dt_in = wide[..., :length]
        assert _rows_in_place(dt_in) is not dt_in
    out = project_time_steps_triton(leaves[0], dt_in)
    assert out.shape == reference[0].shape and out.dtype == dtype
    out.backward(grad.to(device=device, dtype=dtype))
    return max_relative_errors(("delta", "weight", "dt"), [out] + [t.grad for t in leaves], reference)


def compiled_matches_eager() -> float:
    """The custom-op route (taken under torch.compile) against the eager route, outputs and grads."""
    from defmamba.ops.time_step_projection import project_time_steps_triton

    return compiled_vs_eager(project_time_steps_triton, torch.randn(3, 20, 6), torch.randn(2, 3, 6, 36))


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_under_interpreter(__file__)


def test_kernel_matches_float64_in_interpreter(interpreted):
    errors = dict(interpreted)
    assert errors.pop("compiled vs eager") == 0.0
    for layout in ("view", "padded rows"):
        assert_cases_within({case: errors.pop(case) for case in list(errors) if case.startswith(layout)}, 1e-6,
                            cases=len(CASES))
    assert_cases_within(errors, 1e-6, cases=len(CASES))


@pytest.mark.cuda
@needs_triton_gpu
@pytest.mark.parametrize("case", CASES + [(2, 3, 96, 6, 3136), (2, 3, 192, 12, 784), (2, 3, 384, 24, 196),
                                          (2, 3, 768, 48, 49)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "view", "padded rows"])
def test_kernel_matches_float64_gpu(case, dtype, layout):
    """float32: the kernel's output within 1e-6; the gradients (cuBLAS float32 matmuls summing up to
    B·L = 6272 products, measured 1.5e-6 on an H100) within 1e-5. Half types: their rounding. dt
    contiguous, read in place among other rows, or copied from padded rows (``layout``)."""
    half = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype)
    for name, err in max_errors(case, dtype, "cuda", seed=sum(case), layout=layout).items():
        tolerance = half or (1e-6 if name == "delta" else 1e-5)
        assert err <= tolerance, f"{name} off by {err:.2e} of its largest entry"


@pytest.mark.cuda
@needs_triton_gpu
def test_follows_autocast_like_torch_matmul_gpu():
    """Under autocast: the result in the autocast dtype, the float32 weight's gradient in float32,
    both within half-precision rounding of torch.matmul under the same autocast."""
    weight = torch.randn(3, 96, 6, device="cuda", requires_grad=True)
    dt = torch.randn(4, 3, 6, 196, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = project_time_steps(weight, dt)
        expected = torch.matmul(weight, dt)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=1.6e-2, atol=1e-2)
    (got_grad,) = torch.autograd.grad(got.float().sum(), weight)
    (expected_grad,) = torch.autograd.grad(expected.float().sum(), weight)
    assert got_grad.dtype == torch.float32
    torch.testing.assert_close(got_grad, expected_grad, rtol=1.6e-2, atol=1e-2)


def test_off_gpu_it_is_torch_matmul_with_autocast_rule():
    g = torch.Generator().manual_seed(0)
    weight, dt = torch.randn(3, 10, 4, generator=g), torch.randn(2, 3, 4, 15, generator=g)
    assert torch.equal(project_time_steps(weight, dt), torch.matmul(weight, dt))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = project_time_steps(weight, dt), torch.matmul(weight, dt)
    assert got.dtype == expected.dtype == torch.bfloat16 and torch.equal(got, expected)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"weight must be \(K, D, R\) and dt \(B, K, R, L\)"):
        project_time_steps(torch.randn(3, 10, 4), torch.randn(2, 3, 5, 15))


if __name__ == "__main__":  # the interpreter check (run by the tests above in a subprocess)
    results = {str(case): max_errors(case, torch.float32, "cpu", seed=i) for i, case in enumerate(CASES)}
    results.update({f"{layout} {case}": max_errors(case, torch.float32, "cpu", seed=i, layout=layout)
                    for layout in ("view", "padded rows") for i, case in enumerate(CASES)})
    results["compiled vs eager"] = compiled_matches_eager()
    print(json.dumps(results))
