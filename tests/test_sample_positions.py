"""Sample points, bias-table points and path positions from the offset maps, and the bias table's
resize that runs in the same launch: the Triton kernels against the PyTorch formulation in float64.

On CPU the kernels run under Triton's interpreter (a subprocess with TRITON_INTERPRET=1); on a GPU
they run compiled. Inputs are fresh random offsets (channels-last and contiguous, float32 and
float16, maps with a 1-pixel axis and more pairs than one program holds) and random constants.
"""
from __future__ import annotations

import functools
import json

import pytest
import torch
from triton_helpers import assert_cases_within, needs_triton_gpu, run_under_interpreter

from defmamba.ops import deformable_sampling as ds
from defmamba.ops.deformable_sampling.reference import sample_positions_reference
from defmamba.ops.table_resize import resize_channels_last, table_resize

# (batch, h, w): non-square, a 1-pixel-high and a 1-pixel-wide map, 286 (image, token) pairs (> 256).
CASES = [(2, 5, 7), (3, 1, 9), (1, 6, 1), (2, 13, 11)]
OUTPUTS = ("grid", "disp", "path")
# (batch, h, w, channels, table rows, table columns): up- and downsizing, 1-pixel axes, a non-square
# table, channels over several blocks of 64 and pixels over several programs of the resize
TABLE_CASES = [(2, 5, 7, 6, 7, 7), (3, 1, 9, 5, 7, 7), (1, 6, 1, 70, 7, 5), (2, 13, 11, 130, 7, 7),
               (1, 3, 3, 3, 4, 6), (1, 7, 7, 2, 7, 7)]
TABLE_OUTPUTS = OUTPUTS + ("table",)


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


@functools.cache
def interpreter_results() -> dict:
    """The ``__main__`` check's results, run once per test process."""
    return run_under_interpreter(__file__)


def test_triton_kernels_match_float64_reference_in_interpreter():
    errors = {case: errs for case, errs in interpreter_results().items() if not case.startswith("table")}
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


def table_fn(offsets, table, resize, **constants):
    from defmamba.ops.deformable_sampling.positions_triton import sample_positions_and_table_triton

    return sample_positions_and_table_triton(offsets, **constants, table=table, resize=resize)


def reference_table_fn(offsets, table, resize, **constants):
    return (*sample_positions_reference(offsets, **constants), resize_channels_last(table, resize.weight_y,
                                                                                     resize.weight_x))


def run_table_op(fn, case: tuple, seed: int, table_dtype: torch.dtype, dtype: torch.dtype, device: str,
                 used: tuple[str, ...] = TABLE_OUTPUTS) -> list:
    """The four outputs and the gradients of the offsets and the table (float64, on the CPU; zeros
    where none reached it) of ``fn`` for fresh inputs of ``case`` in ``dtype`` (positions and resize
    weights in float32, or float64 for float64), for a fixed random weighting of the outputs
    ``used``. The table is drawn in ``table_dtype`` (a float64 run reads the same rounded values)."""
    batch, h, w, channels, rows, cols = case
    inputs = make_inputs(batch, h, w, seed=seed, channels_last=seed % 2 == 0)
    g = torch.Generator().manual_seed(seed + 2)
    table = torch.randn(channels, rows, cols, generator=g, dtype=torch.float64).to(table_dtype)
    weights = [torch.randn(shape, generator=g, dtype=torch.float64) for shape in
               ((batch, h, w, 2), (batch, h, w, 2), (batch, h * w), (h, w, channels))]
    position_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    offsets = inputs["offsets"].to(device=device, dtype=dtype).requires_grad_()
    leaf = table.to(device=device, dtype=torch.float64 if dtype == torch.float64 else table_dtype).requires_grad_()
    constants = {k: v.to(device=device, dtype=torch.float32 if k == "offset_scale_xy" else position_dtype)
                 for k, v in inputs.items() if k != "offsets"}
    outputs = fn(offsets, leaf, table_resize((rows, cols), h, w, device, position_dtype), **constants)
    sum((o.double() * wt.to(device)).sum() for name, o, wt in zip(TABLE_OUTPUTS, outputs, weights)
        if name in used).backward()
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in (offsets, leaf)]
    return [o.detach().double().cpu() for o in outputs] + [g.double().cpu() for g in grads]


def table_errors(case: tuple, seed: int, table_dtype: torch.dtype, device: str,
                 used: tuple[str, ...] = TABLE_OUTPUTS) -> dict:
    """Largest error of each output of the Triton positions-and-table op and of the gradients of
    the offsets and the table, relative to the largest entry of the float64 reference (absolute
    where that is zero: a gradient no output in ``used`` reaches)."""
    want = run_table_op(reference_table_fn, case, seed, table_dtype, torch.float64, "cpu", used)
    got = run_table_op(table_fn, case, seed, table_dtype, torch.float32, device, used)
    return {name: ((a - b).abs().max() / b.abs().max().clamp_min(1.0 if not b.any() else 1e-30)).item()
            for name, a, b in zip(TABLE_OUTPUTS + ("offsets grad", "table grad"), got, want)}


def test_positions_and_table_kernel_match_float64_reference_in_interpreter():
    errors = {case: errs for case, errs in interpreter_results().items() if case.startswith("table")}
    assert errors.pop("table compiled vs eager")["max abs difference"] == 0.0
    half = {case: errors.pop(case) for case in list(errors) if "float16" in case}
    # a float16 table: the resized table is rounded to float16 (2^-11 of its largest entry at most)
    assert_cases_within(half, 1e-3, cases=2)
    assert_cases_within(errors, 1e-6, cases=len(TABLE_CASES) + 2)


@pytest.mark.cuda
@needs_triton_gpu
@pytest.mark.parametrize("case", TABLE_CASES + [(2, 56, 56, 96, 7, 7), (2, 200, 336, 192, 7, 7), (1, 25, 42, 384, 7, 7)])
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
def test_positions_and_table_kernel_match_float64_reference_gpu(case, table_dtype):
    tolerance = 1e-6 if table_dtype == torch.float32 else 8e-3  # bfloat16 rounds the resized table (2^-8)
    for name, err in table_errors(case, sum(case), table_dtype, "cuda").items():
        assert err <= (tolerance if name in ("table", "table grad") else 1e-6), f"{name} off by {err:.2e}"


@pytest.mark.cuda
@needs_triton_gpu
def test_positions_and_table_take_one_launch_and_equal_the_separate_ops_on_the_gpu():
    """The positions equal :func:`sample_positions`' bit for bit (the same programs), the resized
    table the matmul resize's to float32 rounding (TF32 off), in one kernel launch."""
    inputs = {k: v.cuda().float() for k, v in make_inputs(4, 28, 20, seed=5, channels_last=True).items()}
    offsets = inputs.pop("offsets").half()
    table = torch.randn(96, 7, 7, device="cuda")
    resize = table_resize((7, 7), 28, 20, "cuda")
    ds.sample_positions_and_table(offsets, **inputs, table=table, resize=resize)  # compiles the kernel
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        got = ds.sample_positions_and_table(offsets, **inputs, table=table, resize=resize)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1, [e.name for e in kernels]
    for a, b in zip(got[:3], ds.sample_positions(offsets, **inputs)):
        assert torch.equal(a, b)
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        want = resize_channels_last(table, resize.weight_y, resize.weight_x)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    assert (got[3] - want).abs().max().item() <= 2.5e-7 * table.abs().max().item()


def test_positions_and_table_on_cpu_are_the_two_functions():
    inputs = make_inputs(2, 4, 3, seed=0, channels_last=False)
    table = torch.randn(5, 7, 7, dtype=torch.float64)
    resize = table_resize((7, 7), 4, 3, dtype=torch.float64)
    got = ds.sample_positions_and_table(**inputs, table=table, resize=resize)
    want = (*sample_positions_reference(**inputs), resize_channels_last(table, resize.weight_y, resize.weight_x))
    assert len(got) == 4 and all(a.dtype == torch.float64 and torch.equal(a, b) for a, b in zip(got, want))


def test_positions_and_table_with_mismatched_resize_is_a_clear_error():
    inputs = make_inputs(2, 4, 3, seed=0, channels_last=False)
    with pytest.raises(ValueError, match=r"resize weights \(h=4, rows\) and \(w=3, columns\)"):
        ds.sample_positions_and_table(**inputs, table=torch.randn(5, 7, 7, dtype=torch.float64),
                                      resize=table_resize((7, 7), 3, 4, dtype=torch.float64))


def table_compiled_matches_eager() -> float:
    """The custom-op route of the positions-and-table op (taken under torch.compile) against its
    eager route, outputs and gradients."""
    eager = run_table_op(table_fn, TABLE_CASES[0], 4, torch.float32, torch.float32, "cpu")
    compiled = run_table_op(torch.compile(table_fn, backend="aot_eager"), TABLE_CASES[0], 4, torch.float32,
                            torch.float32, "cpu")
    return max((a - b).abs().max().item() for a, b in zip(compiled, eager))


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
    results["table compiled vs eager"] = {"max abs difference": table_compiled_matches_eager()}
    for i, case in enumerate(TABLE_CASES):
        results[f"table {case} float32"] = table_errors(case, 20 + i, torch.float32, "cpu")
    for i, case in enumerate(TABLE_CASES[:2]):
        results[f"table {case} float16"] = table_errors(case, 30 + i, torch.float16, "cpu")
    # one of the two gradients reached by no output: it is zero (the other as before)
    results["table: positions only"] = table_errors(TABLE_CASES[3], 40, torch.float32, "cpu", used=OUTPUTS)
    results["table: table only"] = table_errors(TABLE_CASES[3], 41, torch.float32, "cpu", used=("table",))
    print(json.dumps(results))
