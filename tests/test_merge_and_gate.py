"""merge_and_gate: the Triton kernels against the PyTorch formulation in float64 (CPU: Triton's
interpreter in a subprocess; GPU: compiled), on fresh random inputs of odd and non-square sizes,
with the gate dense and as the channel half of a wider tensor (as the DSSM passes it), plus the
shape checks and the dispatch."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from triton_helpers import assert_cases_within, needs_triton_gpu, run_under_interpreter

from defmamba.ops import scan_orders
from defmamba.ops.dispatch import use_kernels
from defmamba.ops.permute import invert_permutation

# (batch, channels, h, w): channels below, at and above one channel tile; a 1-pixel axis; a length
# that is not a multiple of the token tile.
CASES = [(2, 5, 5, 7), (3, 40, 1, 9), (1, 33, 13, 11), (2, 64, 8, 8)]


def make_inputs(batch: int, channels: int, h: int, w: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    length = h * w
    order = torch.stack([torch.randperm(length, generator=g) for _ in range(batch)])
    return dict(ys=torch.randn(batch, 3, channels, length, generator=g, dtype=torch.float64),
                order=order, inverse=invert_permutation(order),
                z=torch.randn(batch, h, w, channels, generator=g, dtype=torch.float64))


def reference(ys, order, inverse, z):
    """The DSSM's original formulation: merge, back to channels-last, cast, gate with SiLU(z)."""
    merged = scan_orders.merge_scan_orders(ys, order, inverse)
    return merged.transpose(1, 2).reshape(z.shape).to(z.dtype) * F.silu(z)


def as_half_of_wider(z: torch.Tensor) -> torch.Tensor:
    """z's values as the second channel half of a (B, h, w, 2D) tensor (in_proj's output layout)."""
    wider = torch.cat((torch.full_like(z, float("nan")), z), dim=-1)
    return wider[..., z.shape[-1]:]


def run(fn, inputs: dict, ys_dtype: torch.dtype, z_dtype: torch.dtype, device: str, weight: torch.Tensor,
        strided_gate: bool = False):
    """Output and the gradients of ys and z for the loss sum(weight · out); with ``strided_gate``
    z is passed as the channel half of a wider tensor."""
    ys = inputs["ys"].detach().to(device=device, dtype=ys_dtype).requires_grad_()
    z = inputs["z"].detach().to(device=device, dtype=z_dtype).requires_grad_()
    gate = as_half_of_wider(z) if strided_gate else z
    out = fn(ys, inputs["order"].to(device), inputs["inverse"].to(device), gate)
    assert out.dtype == z_dtype and out.shape == z.shape
    (out.double() * weight.to(device)).sum().backward()
    return out.double().cpu(), ys.grad.double().cpu(), z.grad.double().cpu()


def triton_fn(ys, order, inverse, z):
    from defmamba.ops.scan_orders import triton as kernels

    return kernels.merge_and_gate_triton(ys, inverse, z)


def max_errors(case: tuple, ys_dtype: torch.dtype, z_dtype: torch.dtype, device: str, seed: int,
               strided_gate: bool = False) -> dict:
    """Largest error of the Triton results relative to the largest float64 reference entry."""
    inputs = make_inputs(*case, seed=seed)
    # The reference sees the same rounded inputs.
    inputs["ys"] = inputs["ys"].to(ys_dtype).double()
    inputs["z"] = inputs["z"].to(z_dtype).double()
    weight = torch.randn(inputs["z"].shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    ref = run(reference, inputs, torch.float64, torch.float64, "cpu", weight)
    got = run(triton_fn, inputs, ys_dtype, z_dtype, device, weight, strided_gate)
    return {name: ((a - b).abs().max() / b.abs().max()).item() for name, a, b in zip(("out", "ys", "z"), got, ref)}


def compiled_matches_eager() -> float:
    """The kernels through the custom op (aot_eager) against the direct eager route."""
    inputs = make_inputs(2, 5, 3, 4, seed=5)
    weight = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    eager = run(triton_fn, inputs, torch.float32, torch.float32, "cpu", weight)
    compiled = run(torch.compile(triton_fn, backend="aot_eager"), inputs, torch.float32, torch.float32, "cpu", weight)
    return max((a - b).abs().max().item() for a, b in zip(eager, compiled))


def test_triton_kernels_match_float64_reference_in_interpreter():
    errors = run_under_interpreter(__file__)
    assert errors.pop("compiled vs eager") == 0.0
    assert_cases_within(errors, 1e-6, cases=2 * len(CASES))


@pytest.mark.cuda
@needs_triton_gpu
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("strided_gate", [False, True], ids=["dense-gate", "strided-gate"])
@pytest.mark.parametrize("z_dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_triton_kernels_match_float64_reference_gpu(case, strided_gate, z_dtype, tol):
    """float32 scan outputs and a gate in each dtype, as the model runs with and without autocast;
    half results carry one or two roundings of that type."""
    for name, err in max_errors(case, torch.float32, z_dtype, "cuda", seed=sum(case), strided_gate=strided_gate).items():
        assert err <= tol, f"{name} off by {err:.2e}"


@pytest.mark.cuda
@needs_triton_gpu
def test_gpu_result_is_the_pytorch_formulation_under_autocast_rounding():
    """The same roundings as the PyTorch formulation: mean in float32, cast to the gate's dtype,
    gated product rounded once."""
    inputs = make_inputs(4, 96, 14, 14, seed=3)
    ys = inputs["ys"].float().cuda()
    z = inputs["z"].to(torch.bfloat16).cuda()
    order, inverse = inputs["order"].cuda(), inputs["inverse"].cuda()
    expected = reference(ys, order, inverse, z)
    for gate in (z, as_half_of_wider(z)):
        torch.testing.assert_close(triton_fn(ys, order, inverse, gate), expected, rtol=0, atol=0,
                                   msg="the Triton result differs from the PyTorch formulation")


def test_a_gate_that_is_not_evenly_strided_is_copied_not_misread():
    """A transposed gate (tokens not evenly strided) goes through a copy: same values as dense."""
    from defmamba.ops.scan_orders.triton import _token_stride

    z = torch.randn(2, 5, 3, 4)
    assert _token_stride(z) == 4 and _token_stride(as_half_of_wider(z)) == 8
    assert _token_stride(z.transpose(1, 2)) == 0 and _token_stride(z[:, :, :, ::2]) == 0
    assert _token_stride(torch.randn(1, 1, 1, 8)[..., 2:6]) == 4  # one token: any stride is fine


def test_dispatch_uses_pytorch_formulation_off_gpu():
    inputs = make_inputs(2, 6, 3, 5, seed=1)
    assert not use_kernels("scan_orders", inputs["ys"], inputs["z"])
    out = scan_orders.merge_and_gate(**inputs)
    torch.testing.assert_close(out, reference(**inputs), rtol=0, atol=0)


@pytest.mark.parametrize("name,shape", [("ys", (2, 2, 6, 15)), ("z", (2, 3, 4, 6)), ("z", (2, 3, 5, 7)),
                                        ("inverse", (2, 14)), ("order", (1, 15))])
def test_wrong_shapes_are_clear_errors(name, shape):
    inputs = make_inputs(2, 6, 3, 5, seed=2)
    inputs[name] = torch.zeros(shape, dtype=inputs[name].dtype)
    with pytest.raises(ValueError, match=name):
        scan_orders.merge_and_gate(**inputs)


if __name__ == "__main__":  # the interpreter check (run by the test above in a subprocess)
    results = {"compiled vs eager": compiled_matches_eager()}
    for i, case in enumerate(CASES):
        results[str(case)] = max_errors(case, torch.float32, torch.float32, "cpu", seed=i)
        results[f"{case} strided gate"] = max_errors(case, torch.float32, torch.float32, "cpu", seed=i,
                                                     strided_gate=True)
    print(json.dumps(results))
