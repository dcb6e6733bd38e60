"""The deformable-sequence op: the Triton kernels against the PyTorch formulation in float64.

On CPU the kernels run under Triton's interpreter (a subprocess with TRITON_INTERPRET=1, which
Triton reads when the kernels are defined); on a GPU they run compiled. Inputs are fresh random
maps of odd and non-square sizes, a 1-pixel axis and more images than the table gradient has
partial copies, with points reaching outside the map so that the zero padding is exercised.
"""
from __future__ import annotations

import json

import pytest
import torch
from triton_helpers import assert_cases_within, needs_triton_gpu, run_under_interpreter

from defmamba.ops import deformable_sampling as ds
from defmamba.ops.deformable_sampling.reference import sample_in_path_order_reference
from defmamba.ops.permute import invert_permutation

# (batch, channels, h, w): channels below, at and above one channel block; a 1-pixel-wide map;
# 10 images (> 8 partial copies of the table gradient).
CASES = [(2, 5, 5, 7), (3, 70, 6, 1), (10, 3, 4, 9), (1, 64, 1, 1)]
# For the exact path gradient: power-of-two channel counts (see path_gradient_is_exact), one and two
# channel blocks, odd and non-square maps of one and several blocks of slots.
PATH_CASES = [(3, 1, 5, 7), (2, 8, 6, 1), (4, 128, 9, 4)]
INPUTS = ("x", "grid", "table", "disp", "path")


def make_inputs(batch: int, channels: int, h: int, w: int, seed: int, channels_last: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, h, w, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return dict(x=x,
                grid=torch.rand(batch, h, w, 2, generator=g, dtype=torch.float64) * 2.4 - 1.2,
                table=torch.randn(channels, h, w, generator=g, dtype=torch.float64),
                disp=torch.rand(batch, h, w, 2, generator=g, dtype=torch.float64) * 2.4 - 1.2,
                # Distinct small integers: exact in every dtype, so every precision sorts alike.
                path=torch.stack([torch.randperm(h * w, generator=g) for _ in range(batch)]).double())


def run_op(fn, inputs: dict, dtype: torch.dtype, device: str, weight: torch.Tensor):
    """Sequence and the gradients of every input for the loss sum(weight · seq)."""
    leaves = {k: v.to(device=device, dtype=dtype).detach().requires_grad_() for k, v in inputs.items()}
    seq, order, inverse = fn(**leaves)
    (seq.double() * weight.to(device)).sum().backward()
    return seq.double().cpu(), order.cpu(), {k: leaves[k].grad.double().cpu() for k in INPUTS}


def triton_fn(x, grid, table, disp, path):
    from defmamba.ops.deformable_sampling.triton import sample_in_path_order_triton

    return sample_in_path_order_triton(x, grid, table, disp, path)


def max_errors(inputs: dict, dtype: torch.dtype, device: str, seed: int) -> dict:
    """Largest error of the Triton result relative to the largest reference entry, per output."""
    batch, channels, h, w = inputs["x"].shape
    weight = torch.randn(batch, h * w, channels, generator=torch.Generator().manual_seed(seed + 1),
                         dtype=torch.float64)
    ref_seq, ref_order, ref_grads = run_op(sample_in_path_order_reference, inputs, torch.float64, "cpu", weight)
    seq, order, grads = run_op(triton_fn, inputs, dtype, device, weight)
    assert torch.equal(order, ref_order)

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()

    return {"seq": rel(seq, ref_seq), **{k: rel(grads[k], ref_grads[k]) for k in INPUTS}}


def path_gradient_is_exact(batch: int, channels: int, h: int, w: int, seed: int, device: str) -> bool:
    """The path gradient the backward kernel adds up with atomics is, bit for bit, the formula
    ``mean - gather(mean, 1, inverse)`` of the channel means at the sequence slots.

    The incoming gradient is non-zero in one channel only and ``channels`` a power of two, so the
    kernel's means are exactly t / channels whatever its summation order; t has full mantissas over
    several binades, so that the differences round."""
    g = torch.Generator().manual_seed(seed)
    inputs = {k: v.to(device=device, dtype=torch.float32).requires_grad_()
              for k, v in make_inputs(batch, channels, h, w, seed).items()}
    t = torch.randn(batch, h * w, generator=g) * 2.0 ** torch.randint(-6, 7, (batch, h * w), generator=g)
    grad = torch.zeros(batch, h * w, channels)
    grad[..., channels // 2] = t
    seq, order, _ = triton_fn(**inputs)
    seq.backward(grad.to(device))
    mean = (t / channels).to(device)
    return torch.equal(inputs["path"].grad, mean - torch.gather(mean, 1, invert_permutation(order)))


def inverse_is_exact(inputs: dict, device: str) -> bool:
    """The inverse the forward kernel writes is ``invert_permutation(order)``, dtype and values."""
    _, order, inverse = triton_fn(**{k: v.to(device=device, dtype=torch.float32) for k, v in inputs.items()})
    return inverse.dtype == order.dtype and torch.equal(inverse, invert_permutation(order))


def exact_checks(device: str) -> dict[str, bool]:
    """Every exact check of the kernels, by name."""
    return {**{f"inverse {case}": inverse_is_exact(make_inputs(*case, seed=i), device) for i, case in enumerate(CASES)},
            **{f"path gradient {case}": path_gradient_is_exact(*case, seed=i, device=device)
               for i, case in enumerate(PATH_CASES)}}


def test_triton_kernels_match_float64_reference_in_interpreter():
    errors = run_under_interpreter(__file__)
    # The same kernels through the custom op; only the atomics' summation order may differ.
    assert errors.pop("compiled vs eager")["max abs difference"] <= 1e-6
    exact = errors.pop("exact")
    assert len(exact) == len(CASES) + len(PATH_CASES) and all(exact.values()), exact
    assert_cases_within(errors, 1e-5, cases=2 * len(CASES))


@pytest.mark.cuda
@needs_triton_gpu
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("channels_last", [True, False])
def test_triton_kernels_match_float64_reference_gpu(case, channels_last):
    inputs = make_inputs(*case, seed=sum(case), channels_last=channels_last)
    for name, err in max_errors(inputs, torch.float32, "cuda", seed=sum(case)).items():
        assert err <= 1e-5, f"{name} off by {err:.2e} of its largest entry"


@pytest.mark.cuda
@needs_triton_gpu
def test_exact_checks_gpu():
    failed = [name for name, ok in exact_checks("cuda").items() if not ok]
    assert not failed, failed


@pytest.mark.cuda
@needs_triton_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_maps_gpu(dtype):
    """A half-precision map (as under autocast): the sequence is rounded once, after float32 sums."""
    # The reference gets the same rounded inputs: what is compared is the arithmetic (float32 sums,
    # one rounding of the sequence and of each gradient), not the rounding of the inputs.
    inputs = {k: v.to(dtype).double() for k, v in make_inputs(4, 96, 14, 10, seed=3).items()}
    tol = 1.6e-2 if dtype == torch.bfloat16 else 2e-3
    for name, err in max_errors(inputs, dtype, "cuda", seed=3).items():
        assert err <= tol, f"{name} off by {err:.2e} of its largest entry"


@pytest.mark.cuda
@needs_triton_gpu
def test_deterministic_mode_runs_the_pytorch_formulation_gpu(monkeypatch):
    inputs = {k: v.float().cuda() for k, v in make_inputs(1, 3, 2, 2, seed=0).items()}
    calls = []
    monkeypatch.setattr(ds, "sample_in_path_order_triton", lambda *args: calls.append("kernels"))
    ds.sample_in_path_order(**inputs)
    assert calls == ["kernels"]
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    seq, _, _ = ds.sample_in_path_order(**inputs)
    assert calls == ["kernels"] and seq.shape == (1, 4, 3)


def test_dispatch_uses_pytorch_formulation_off_gpu():
    inputs = make_inputs(2, 4, 3, 5, seed=0)
    seq, order, inverse = ds.sample_in_path_order(**inputs)
    ref_seq, ref_order, _ = sample_in_path_order_reference(**inputs)
    assert torch.equal(seq, ref_seq) and torch.equal(order, ref_order)
    assert torch.equal(torch.gather(order, 1, inverse), torch.arange(15).expand(2, -1))


@pytest.mark.parametrize("name,shape", [("grid", (2, 3, 4, 2)), ("table", (4, 5, 3)), ("path", (2, 14))])
def test_wrong_shapes_are_clear_errors(name, shape):
    inputs = make_inputs(2, 4, 3, 5, seed=0)
    inputs[name] = torch.zeros(shape, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"{name} must be"):
        ds.sample_in_path_order(**inputs)


def compiled_matches_eager() -> float:
    """The custom-op route (taken under torch.compile) against the eager route, outputs and grads."""
    inputs = {k: v.float() for k, v in make_inputs(2, 5, 5, 7, seed=9).items()}
    weight = torch.randn(2, 35, 5, dtype=torch.float64)
    _, _, eager = run_op(triton_fn, inputs, torch.float32, "cpu", weight)
    compiled_fn = torch.compile(triton_fn, backend="aot_eager")
    _, _, compiled = run_op(compiled_fn, inputs, torch.float32, "cpu", weight)
    return max((compiled[k] - eager[k]).abs().max().item() for k in INPUTS)


if __name__ == "__main__":  # the interpreter check (run by the test above in a subprocess)
    results = {"compiled vs eager": {"max abs difference": compiled_matches_eager()}, "exact": exact_checks("cpu")}
    for i, case in enumerate(CASES):
        for channels_last in (True, False):
            inputs = make_inputs(*case, seed=i, channels_last=channels_last)
            results[f"{case} channels_last={channels_last}"] = max_errors(inputs, torch.float32, "cpu", seed=i)
    print(json.dumps(results))
