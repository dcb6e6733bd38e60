"""Sample points, bias-table points and path positions from the offset maps: the Triton kernels
against the PyTorch formulation in float64.

On CPU the kernels run under Triton's interpreter (a subprocess with TRITON_INTERPRET=1); on a GPU
they run compiled. Inputs are fresh random offsets (channels-last and contiguous, float32 and
float16, maps with a 1-pixel axis and more pairs than one program holds) and random constants.
"""
from __future__ import annotations

import json

import pytest
import torch
from triton_helpers import assert_cases_within, needs_triton_gpu, run_under_interpreter

from defmamba.ops import deformable_sampling as ds
from defmamba.ops.deformable_sampling.reference import sample_positions_reference

# (batch, h, w): non-square, a 1-pixel-high and a 1-pixel-wide map, 286 (image, token) pairs (> 256).
CASES = [(2, 5, 7), (3, 1, 9), (1, 6, 1), (2, 13, 11)]
OUTPUTS = ("grid", "disp", "path")


def make_inputs(batch: int, h: int, w: int, seed: int, channels_last: bool) -> dict:
    """float64 offsets (pre-tanh, some beyond tanh's linear range) and constants."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.randn(batch, 3, h, w, generator=g, dtype=torch.float64) * 1.5
    if channels_last:
        offsets = offsets.contiguous(memory_format=torch.channels_last)
    scale = torch.tensor([1 / max(w - 1, 1), 1 / max(h - 1, 1)], dtype=torch.float32).double()
    return dict(offsets=offsets, offset_scale_xy=scale,
                reference_xy=torch.rand(h, w, 2, generator=g, dtype=torch.float64) * 2 - 1,
                half_key_xy=torch.rand(h, w, 2, generator=g, dtype=torch.float64) - 0.5,
                reference_path=torch.linspace(-1, 1, h * w, dtype=torch.float64))


def run_op(fn, inputs: dict, offsets_dtype: torch.dtype, device: str, weights: dict, used=OUTPUTS):
    """The three outputs and the offsets' gradient for the loss Σ weight · output over ``used``."""
    offsets = inputs["offsets"].to(device=device, dtype=offsets_dtype).detach().requires_grad_()
    position_dtype = torch.float64 if offsets_dtype == torch.float64 else torch.float32
    constants = {k: v.to(device=device, dtype=torch.float32 if k == "offset_scale_xy" else position_dtype)
                 for k, v in inputs.items() if k != "offsets"}
    outputs = dict(zip(OUTPUTS, fn(offsets, **constants)))
    sum(((outputs[k].double() * weights[k].to(device)).sum() for k in used)).backward()
    return {k: v.detach().double().cpu() for k, v in outputs.items()}, offsets.grad.double().cpu()


def triton_fn(offsets, **constants):
    from defmamba.ops.deformable_sampling.positions_triton import sample_positions_triton

    return sample_positions_triton(offsets, **constants)


def max_errors(inputs: dict, offsets_dtype: torch.dtype, device: str, seed: int, used=OUTPUTS) -> dict:
    """Largest error of each Triton output and of the offsets' gradient, relative to the largest
    reference entry. The reference reads the same rounded offsets."""
    batch, _, h, w = inputs["offsets"].shape
    g = torch.Generator().manual_seed(seed + 1)
    weights = {"grid": torch.randn(batch, h, w, 2, generator=g, dtype=torch.float64),
               "disp": torch.randn(batch, h, w, 2, generator=g, dtype=torch.float64),
               "path": torch.randn(batch, h * w, generator=g, dtype=torch.float64)}
    rounded = {**inputs, "offsets": inputs["offsets"].to(offsets_dtype).double()}
    ref_out, ref_grad = run_op(sample_positions_reference, rounded, torch.float64, "cpu", weights, used)
    out, grad = run_op(triton_fn, inputs, offsets_dtype, device, weights, used)

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()

    return {**{k: rel(out[k], ref_out[k]) for k in OUTPUTS}, "offsets grad": rel(grad, ref_grad)}


def test_triton_kernels_match_float64_reference_in_interpreter():
    errors = run_under_interpreter(__file__)
    assert errors.pop("compiled vs eager")["max abs difference"] == 0.0
    half = {case: errors.pop(case) for case in list(errors) if "float16" in case}
    # float16 offsets: the outputs are float32 from the same rounded offsets; the gradient is
    # rounded to float16 (a relative 2^-11 of its largest entry at most).
    assert_cases_within(half, 1e-3, cases=len(CASES))
    assert_cases_within(errors, 1e-6, cases=2 * len(CASES) + 1)


@pytest.mark.cuda
@needs_triton_gpu
@pytest.mark.parametrize("case", CASES + [(4, 56, 56)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_triton_kernels_match_float64_reference_gpu(case, channels_last):
    inputs = make_inputs(*case, seed=sum(case), channels_last=channels_last)
    for name, err in max_errors(inputs, torch.float32, "cuda", seed=sum(case)).items():
        assert err <= 1e-6, f"{name} off by {err:.2e} of its largest entry"


@pytest.mark.cuda
@needs_triton_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernels_round_as_the_pytorch_formulation_on_the_gpu(dtype):
    """On the GPU the kernels give the PyTorch formulation's float32 values (libdevice's tanh, no
    fused multiply-adds) to the last bit or one rounding step of it."""
    inputs = {k: v.cuda() for k, v in make_inputs(8, 28, 20, seed=5, channels_last=True).items()}
    offsets = inputs.pop("offsets").to(dtype)
    constants = {k: v.float() for k, v in inputs.items()}
    for got, want in zip(ds.sample_positions(offsets, **constants), sample_positions_reference(offsets, **constants)):
        assert got.dtype == want.dtype == torch.float32
        assert (got - want).abs().max().item() <= 2.5e-7


def test_cpu_offsets_take_the_pytorch_formulation():
    inputs = make_inputs(2, 4, 3, seed=0, channels_last=False)
    got = ds.sample_positions(**inputs)
    want = sample_positions_reference(**inputs)
    for a, b in zip(got, want):
        assert a.dtype == torch.float64 and torch.equal(a, b)


@pytest.mark.parametrize("name,shape", [("offsets", (2, 2, 4, 3)), ("reference_xy", (3, 4, 2)),
                                        ("half_key_xy", (4, 3)), ("reference_path", (11,)), ("offset_scale_xy", (3,))])
def test_wrong_shapes_are_clear_errors(name, shape):
    inputs = make_inputs(2, 4, 3, seed=0, channels_last=False)
    inputs[name] = torch.zeros(shape, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"{name} must be"):
        ds.sample_positions(**inputs)


def compiled_matches_eager() -> float:
    """The custom-op route (taken under torch.compile) against the eager route, outputs and gradient."""
    inputs = make_inputs(2, 5, 7, seed=9, channels_last=True)
    weights = {k: torch.randn(s, dtype=torch.float64) for k, s in
               (("grid", (2, 5, 7, 2)), ("disp", (2, 5, 7, 2)), ("path", (2, 35)))}
    eager_out, eager_grad = run_op(triton_fn, inputs, torch.float32, "cpu", weights)
    compiled_out, compiled_grad = run_op(torch.compile(triton_fn, backend="aot_eager"), inputs, torch.float32, "cpu",
                                         weights)
    return max([(compiled_out[k] - eager_out[k]).abs().max().item() for k in OUTPUTS]
               + [(compiled_grad - eager_grad).abs().max().item()])


if __name__ == "__main__":  # the interpreter check (run by the test above in a subprocess)
    results = {"compiled vs eager": {"max abs difference": compiled_matches_eager()}}
    for i, case in enumerate(CASES):
        for channels_last in (True, False):
            inputs = make_inputs(*case, seed=i, channels_last=channels_last)
            results[f"{case} float32 channels_last={channels_last}"] = max_errors(inputs, torch.float32, "cpu", seed=i)
        inputs = make_inputs(*case, seed=10 + i, channels_last=True)
        results[f"{case} float16"] = max_errors(inputs, torch.float16, "cpu", seed=10 + i)
    # Only the path reaches the loss: the grid's and disp's gradients are None and count as zero.
    results["path only"] = max_errors(make_inputs(2, 5, 7, seed=3, channels_last=False), torch.float32, "cpu",
                                      seed=3, used=("path",))
    print(json.dumps(results))
