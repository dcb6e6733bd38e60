"""The reference selective scan against a naive sequential float64 loop, autograd checks, the
backend dispatcher, and the triton backend under Triton's interpreter (CPU, in a subprocess):
against float64, eager route against the custom-op route."""
import importlib
import json
import math

import pytest
import torch
import torch.nn.functional as F

from triton_helpers import compiled_vs_eager, run_under_interpreter

from defmamba.ops import selective_scan
from defmamba.ops.selective_scan import ENV_VAR, resolve_backend
from defmamba.ops.selective_scan.reference import selective_scan_torch


def naive_scan(u, delta, A, B, C, D, delta_bias, softplus):
    """One step at a time, in float64: the recurrence exactly as written."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    batch, channels, length = u.shape
    group = channels // B.shape[1]
    dt = delta + (delta_bias.double()[:, None] if delta_bias is not None else 0)
    dt = F.softplus(dt) if softplus else dt
    Bc = B.repeat_interleave(group, dim=1)  # (b, c, N, L)
    Cc = C.repeat_interleave(group, dim=1)
    h = torch.zeros(batch, channels, A.shape[1], dtype=torch.float64)
    ys = []
    for t in range(length):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[..., None] * Bc[..., t]
        ys.append((h * Cc[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    return y + D.double()[:, None] * u if D is not None else y


def random_inputs(batch, groups, per_group, n_state, length, dtype=torch.float32, generator=None):
    g = generator or torch.Generator().manual_seed(0)
    channels = groups * per_group
    u = torch.randn(batch, channels, length, generator=g)
    delta = torch.randn(batch, channels, length, generator=g) * 0.5 - 1
    A = -torch.exp(torch.randn(channels, n_state, generator=g) * 0.5)
    B = torch.randn(batch, groups, n_state, length, generator=g)
    C = torch.randn(batch, groups, n_state, length, generator=g)
    D = torch.randn(channels, generator=g)
    bias = torch.randn(channels, generator=g) * 0.5
    params_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # A, D, bias stay float32
    return ([t.to(dtype) for t in (u, delta)] + [A.to(params_dtype)] + [t.to(dtype) for t in (B, C)]
            + [D.to(params_dtype), bias.to(params_dtype)])


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("length", [1, 7, 64, 197, 3136])
def test_matches_sequential_loop_float64(length):
    g = torch.Generator().manual_seed(length)
    u, delta, A, B, C, D, bias = random_inputs(2, 3, 2 if length > 1000 else 4, 16, length, torch.float64, g)
    expected = naive_scan(u, delta, A, B, C, D, bias, softplus=True)
    got = selective_scan(u, delta, A, B, C, D, bias, delta_softplus=True, backend="torch")
    assert got.dtype == torch.float64
    assert rel_err(got, expected) < 1e-12


@pytest.mark.parametrize("use_softplus,with_optional", [(False, False), (True, True)])
def test_float32_and_optional_arguments(use_softplus, with_optional):
    g = torch.Generator().manual_seed(7)
    u, delta, A, B, C, D, bias = random_inputs(3, 3, 5, 8, 49, torch.float32, g)
    if not use_softplus:
        delta = delta.abs()
    D, bias = (D, bias) if with_optional else (None, None)
    expected = naive_scan(u, delta, A, B, C, D, bias, softplus=use_softplus)
    got = selective_scan(u, delta, A, B, C, D, bias, delta_softplus=use_softplus)
    assert got.dtype == torch.float32
    assert rel_err(got, expected) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_keep_float32_state(dtype):
    g = torch.Generator().manual_seed(3)
    u, delta, A, B, C, D, bias = random_inputs(2, 3, 4, 16, 101, dtype, g)
    expected = naive_scan(u, delta, A, B, C, D, bias, softplus=True)  # same rounded inputs, float64
    got = selective_scan(u, delta, A, B, C, D, bias, delta_softplus=True, out_dtype=torch.float32)
    assert got.dtype == torch.float32
    assert rel_err(got, expected) < 1e-5  # only float32 arithmetic error: the state is never half
    assert selective_scan(u, delta, A, B, C, D, bias, delta_softplus=True).dtype == dtype


def test_long_sequence_with_large_decay_is_finite_and_exact():
    g = torch.Generator().manual_seed(11)
    u, delta, A, B, C, D, bias = random_inputs(1, 3, 2, 16, 4097, torch.float64, g)
    delta = delta.abs() * 50  # Δ·A down to about -1e3 per step: exp underflows, nothing overflows
    A = A * 20
    got = selective_scan(u, delta, A, B, C, D, bias, delta_softplus=True)
    assert torch.isfinite(got).all()
    assert rel_err(got, naive_scan(u, delta, A, B, C, D, bias, softplus=True)) < 1e-12
    grads = torch.autograd.grad(selective_scan(u.requires_grad_(), delta, A, B, C, D, bias, True).sum(), u)
    assert torch.isfinite(grads[0]).all()


def test_gradcheck_all_inputs():
    g = torch.Generator().manual_seed(5)
    inputs = [t.requires_grad_() for t in random_inputs(2, 2, 2, 3, 9, torch.float64, g)]

    def fn(u, delta, A, B, C, D, bias):
        return selective_scan_torch(u, delta, A, B, C, D, bias, True)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(9)
    u, delta, A, B, C, D, bias = random_inputs(2, 3, 4, 8, 33, torch.float64, g)
    u_t = u.transpose(1, 2).contiguous().transpose(1, 2)
    B_t = B.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    assert not u_t.is_contiguous() and not B_t.is_contiguous()
    got = selective_scan(u_t, delta, A, B_t, C, D, bias, delta_softplus=True)
    assert rel_err(got, naive_scan(u, delta, A, B, C, D, bias, softplus=True)) < 1e-12


def test_auto_resolves_to_torch_on_cpu():
    name, _ = resolve_backend("auto", torch.device("cpu"))
    assert name == "torch"


def test_environment_override(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "torch")
    assert resolve_backend("auto", torch.device("cpu"))[0] == "torch"
    monkeypatch.setenv(ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="unknown selective-scan backend.*DEFMAMBA_SCAN_BACKEND=fastest"):
        resolve_backend("auto", torch.device("cpu"))


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_backend_on_cpu_tensors_is_a_clear_error(backend):
    u, delta, A, B, C, D, bias = random_inputs(1, 3, 2, 4, 5)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        selective_scan(u, delta, A, B, C, D, bias, backend=backend)


def test_bad_shapes_are_explained():
    u, delta, A, B, C, D, bias = random_inputs(1, 3, 2, 4, 5)
    with pytest.raises(ValueError, match="B must be"):
        selective_scan(u, delta, A, B[..., :4], C, D, bias)
    with pytest.raises(ValueError, match="multiple of the number of B/C groups"):
        selective_scan(u[:, :5], delta[:, :5], A[:5], B, C, D[:5], bias[:5])
    with pytest.raises(TypeError, match="floating"):
        selective_scan(u.long(), delta, A, B, C, D, bias)
    with pytest.raises(ValueError, match="unknown selective-scan backend"):
        selective_scan(u, delta, A, B, C, D, bias, backend="jax")


def test_auto_dispatch_traces_without_graph_breaks(monkeypatch):
    """Backend resolution (environment variable, cached backends, the one-time log line) must
    not break a fullgraph trace of code that calls the scan with backend="auto"."""
    monkeypatch.setenv(ENV_VAR, "auto")
    torch._dynamo.reset()
    u, delta, A, B, C, D, bias = random_inputs(1, 3, 2, 4, 9)

    def scan(u, delta):
        return selective_scan(u, delta, A, B, C, D, bias, delta_softplus=True)

    compiled = torch.compile(scan, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(u, delta), scan(u, delta))
    torch._dynamo.reset()


def test_single_step_keeps_every_input_in_the_graph():
    """L = 1 (a 1×1 stage): A gets a (zero) gradient rather than none, as DDP requires."""
    u, delta, A, B, C, D, bias = (t.requires_grad_() for t in random_inputs(2, 3, 2, 4, 1))
    selective_scan(u, delta, A, B, C, D, bias, delta_softplus=True).sum().backward()
    assert A.grad is not None and torch.all(A.grad == 0)
    assert all(t.grad is not None for t in (u, delta, B, C, D, bias))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_A_as_logs_is_the_scan_of_minus_exp(dtype):
    """A_is_log: the same output and gradients, bit for bit, as passing A = −exp(A_logs) (the
    model's formula, in A's precision); the logs get the gradient."""
    g = torch.Generator().manual_seed(13)
    u, delta, A, B, C, D, bias = random_inputs(2, 3, 2, 5, 19, dtype, g)
    A_logs = torch.log(-A)
    dy = torch.randn(u.shape, generator=g, dtype=dtype)
    results = []
    for log_form in (True, False):
        leaves = [t.clone().requires_grad_() for t in (u, delta, A_logs, B, C, D, bias)]
        A_in = leaves[2] if log_form else -torch.exp(leaves[2])
        y = selective_scan(*leaves[:2], A_in, *leaves[3:], delta_softplus=True, backend="torch", A_is_log=log_form)
        y.backward(dy)
        results.append([y] + [t.grad for t in leaves])
    for got, expected in zip(*results):
        assert torch.equal(got, expected)


def test_A_as_logs_reaches_each_backend_in_its_form(monkeypatch):
    """The triton backend gets the logs and the flag; the others get −exp(logs)."""
    scan_module = importlib.import_module("defmamba.ops.selective_scan")  # the package, not its function
    u, delta, A, B, C, D, bias = random_inputs(1, 3, 2, 4, 5)
    A_logs = torch.log(-A)
    seen = {}

    def backend(name):
        def fn(u, delta, A, B, C, D, delta_bias, delta_softplus, out_dtype, **flags):
            seen[name] = (A, flags)
            return u
        return fn

    for name in ("triton", "cuda"):
        monkeypatch.setattr(scan_module, "resolve_backend", lambda requested, device, name=name: (name, backend(name)))
        selective_scan(u, delta, A_logs, B, C, D, bias, A_is_log=True)
    assert seen["triton"][0] is A_logs and seen["triton"][1] == {"A_is_log": True}
    assert torch.equal(seen["cuda"][0], -torch.exp(A_logs)) and seen["cuda"][1] == {}


def triton_backend_errors(seed: int) -> dict:
    """Relative L2 errors of the triton backend's output and gradients against float64 on L = 66
    (two stored segments, L not a multiple of the 4-position tile), N = 6 (padded to 8), batch 2
    (each batch element's partial sums of dA, dD, dbias in its own row); then without D and
    delta_bias, and with float16 u, delta, B, C (their gradients cast back to float16)."""
    from defmamba.ops.selective_scan.triton import selective_scan_triton

    errors = {}
    inputs = random_inputs(2, 2, 3, 6, 66, torch.float32, torch.Generator().manual_seed(seed))
    cases = {"float32": (inputs, torch.float32), "float32 no D/bias": (inputs[:5] + [None, None], torch.float32),
             "float16": (inputs, torch.float16)}
    for case, (leaves32, dtype) in cases.items():
        dy = torch.randn(2, 6, 66, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
        # u, delta, B, C in the case's dtype; A, D, delta_bias float32; the reference in float64 from the same values
        kernel_in = [None if t is None else t.detach().to(dtype if i in (0, 1, 3, 4) else torch.float32).requires_grad_()
                     for i, t in enumerate(leaves32)]
        exact_in = [None if t is None else t.detach().double().requires_grad_() for t in kernel_in]
        results = []
        for fn, leaves in ((selective_scan_triton, kernel_in), (selective_scan_torch, exact_in)):
            y = fn(*leaves, delta_softplus=True)
            y.backward(dy.to(y.dtype))
            results.append([y] + [t.grad for t in leaves if t is not None])
        for t in kernel_in:
            assert t is None or t.grad.dtype == t.dtype, f"{case}: a gradient is not in its input's dtype"
        names = ("y", "u", "delta", "A", "B", "C", "D", "delta_bias")
        errors.update({f"{case}: {name}": rel_err(got, ref) for name, got, ref in zip(names, *results)})
    return errors


def triton_log_A_errors(seed: int) -> dict:
    """Relative L2 errors of the triton backend with A_is_log against float64 with A = −exp(A_logs)
    taken in float64, output and gradients (that of the logs included): batch 2, 3 groups of 3
    channels, N = 5 (padded to 8), L = 67 (two stored segments, L odd); float32 and float16 u,
    delta, B, C, float32 A_logs, D, delta_bias."""
    from defmamba.ops.selective_scan.triton import selective_scan_triton

    errors = {}
    u, delta, A, B, C, D, bias = random_inputs(2, 3, 3, 5, 67, torch.float32, torch.Generator().manual_seed(seed))
    leaves32 = [u, delta, torch.log(-A), B, C, D, bias]
    dy = torch.randn(u.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    for dtype in (torch.float32, torch.float16):
        kernel_in = [t.detach().to(dtype if i in (0, 1, 3, 4) else torch.float32).requires_grad_()
                     for i, t in enumerate(leaves32)]
        exact_in = [t.detach().double().requires_grad_() for t in kernel_in]
        y = selective_scan_triton(*kernel_in, delta_softplus=True, A_is_log=True)
        y.backward(dy.to(y.dtype))
        y_ref = selective_scan_torch(*exact_in[:2], -torch.exp(exact_in[2]), *exact_in[3:], delta_softplus=True)
        y_ref.backward(dy)
        names = ("y", "u", "delta", "A_logs", "B", "C", "D", "delta_bias")
        got = [y] + [t.grad for t in kernel_in]
        ref = [y_ref] + [t.grad for t in exact_in]
        errors.update({f"{str(dtype)[6:]}: {name}": rel_err(a, b) for name, a, b in zip(names, got, ref)})
    return errors


def triton_chunked_errors(seed: int) -> dict:
    """The chunked kernels (the sequence cut into chunks run side by side, as on a GPU the batch
    leaves idle), forced here with chunks of one stored segment, and segments of 16 positions
    instead of 64 (a constexpr of the kernels: the same code, a quarter of the interpreter's time):
    relative L2 errors against float64 of the output and every gradient, and the largest relative
    difference from the unchunked kernels. L = 75 (five chunks, the last one partial), batch 1,
    float32; L = 65 (five chunks, the last of one position), batch 2, float16, without delta_bias;
    L = 80, A as logs."""
    from defmamba.ops.selective_scan import triton as kernels

    saved = kernels._SEG, kernels._multiprocessors, kernels._MIN_CHUNK_SEGMENTS
    kernels._SEG = 16
    try:
        cases = {"L=75 float32": (1, 75, torch.float32, True, False),
                 "L=65 float16 no bias": (2, 65, torch.float16, False, False),
                 "L=80 A_is_log": (1, 80, torch.float32, True, True)}
        errors, differences = {}, {}
        for case, (batch, length, dtype, with_bias, log_a) in cases.items():
            u, delta, A, B, C, D, bias = random_inputs(batch, 3, 2, 6, length, torch.float32,
                                                       torch.Generator().manual_seed(seed + length))
            leaves32 = [u, delta, torch.log(-A) if log_a else A, B, C, D, bias if with_bias else None]
            dy = torch.randn(batch, 6, length, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            runs = []
            for chunked in (False, True):
                kernels._multiprocessors = lambda device, chunked=chunked: 64 if chunked else 0
                kernels._MIN_CHUNK_SEGMENTS = 1
                assert kernels._chunking(kernels._n_seg(length), batch * 3, u.device)[0] == (5 if chunked else 1)
                leaves = [None if t is None else t.detach().to(dtype if i in (0, 1, 3, 4) else torch.float32)
                          .requires_grad_() for i, t in enumerate(leaves32)]
                y = kernels.selective_scan_triton(*leaves, delta_softplus=True, A_is_log=log_a)
                y.backward(dy.to(y.dtype))
                runs.append([y] + [t.grad for t in leaves if t is not None])
            exact = [None if t is None else t.detach().to(dtype if i in (0, 1, 3, 4) else torch.float32).double()
                     .requires_grad_() for i, t in enumerate(leaves32)]
            y_ref = selective_scan_torch(*exact[:2], -torch.exp(exact[2]) if log_a else exact[2], *exact[3:],
                                         delta_softplus=True)
            y_ref.backward(dy)
            names = [name for name, t in zip(("y", "u", "delta", "A", "B", "C", "D", "delta_bias"), [y_ref] + exact)
                     if t is not None]
            refs = [y_ref] + [t.grad for t in exact if t is not None]
            errors.update({f"{case}: {name}": rel_err(got, ref) for name, got, ref in zip(names, runs[1], refs)})
            differences.update({f"{case}: {name}": rel_err(a, b) for name, a, b in zip(names, runs[1], runs[0])})
    finally:  # the module as it was, for whatever runs after this in the process
        kernels._SEG, kernels._multiprocessors, kernels._MIN_CHUNK_SEGMENTS = saved
    return {"errors": errors, "differences from unchunked": differences}


def triton_compiled_matches_eager(A_is_log: bool = False) -> float:
    """The custom-op route (taken under torch.compile) against the eager route, outputs and grads."""
    from defmamba.ops.selective_scan.triton import selective_scan_triton

    def scan(u, delta, A, B, C, D, bias):
        return selective_scan_triton(u, delta, A, B, C, D, bias, True, A_is_log=A_is_log)

    u, delta, A, B, C, D, bias = random_inputs(1, 2, 2, 4, 9)
    return compiled_vs_eager(scan, u, delta, torch.log(-A) if A_is_log else A, B, C, D, bias)


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    return run_under_interpreter(__file__)


def test_triton_backend_in_interpreter(interpreter_results):
    assert interpreter_results["compiled vs eager"] == 0.0  # the same kernels, through the custom op
    assert len(interpreter_results["errors"]) == 8 + 6 + 8
    for name, err in interpreter_results["errors"].items():
        tolerance = 1e-3 if name.startswith("float16") else 1e-5  # float16 outputs and gradients: 11-bit mantissa
        assert err <= tolerance, f"{name}: relative error {err:.2e}"


def test_triton_backend_with_A_as_logs_in_interpreter(interpreter_results):
    assert interpreter_results["compiled vs eager, A_is_log"] == 0.0
    assert len(interpreter_results["A_is_log errors"]) == 2 * 8
    for name, err in interpreter_results["A_is_log errors"].items():
        tolerance = 1e-3 if name.startswith("float16") else 1e-5
        assert err <= tolerance, f"A_is_log, {name}: relative error {err:.2e}"


def test_triton_backend_chunked_in_interpreter(interpreter_results):
    """Chunked, the kernels compute the same recurrence: as close to float64 as unchunked, and
    apart from the unchunked results by rounding only (a chunk started from a zero state instead of
    the folded summaries is off by ~1e-1)."""
    chunked = interpreter_results["chunked"]
    assert len(chunked["errors"]) == 8 + 7 + 8
    for name, err in chunked["errors"].items():
        tolerance = 1e-3 if "float16" in name else 1e-5
        assert err <= tolerance, f"chunked, {name}: relative error {err:.2e}"
    for name, difference in chunked["differences from unchunked"].items():
        assert difference <= (2e-3 if "float16" in name else 2e-5), f"chunked, {name}: {difference:.2e}"


def test_chunking_only_a_short_grid_on_a_long_sequence(monkeypatch):
    from defmamba.ops.selective_scan import triton as kernels

    monkeypatch.setattr(kernels, "_multiprocessors", lambda device: 132)
    cuda = torch.device("cuda", 0)
    # a training batch at 224² fills the GPU: one chunk, the whole sequence
    assert kernels._chunking(49, 128 * 3 * 3, cuda) == (1, 49 * 64)
    # 2 images of 1344 × 800, first stage (67,200 positions, 1,050 segments), 18 programs
    chunks, length = kernels._chunking(1050, 18, cuda)
    assert (chunks, length) == (59, 18 * 64) and (chunks - 1) * length < 1050 * 64 <= chunks * length
    # too short a sequence to cut: chunks of at least four segments
    assert kernels._chunking(7, 3, cuda) == (1, 7 * 64)
    assert kernels._chunking(8, 3, cuda) == (2, 4 * 64)
    # off the GPU (the interpreter) nothing is chunked
    monkeypatch.setattr(kernels, "_multiprocessors", lambda device: 0)
    assert kernels._chunking(1050, 1, torch.device("cpu")) == (1, 1050 * 64)


if __name__ == "__main__":  # the interpreter checks (run by the tests above in a subprocess)
    print(json.dumps({"errors": triton_backend_errors(seed=3), "compiled vs eager": triton_compiled_matches_eager(),
                      "A_is_log errors": triton_log_A_errors(seed=4),
                      "compiled vs eager, A_is_log": triton_compiled_matches_eager(A_is_log=True),
                      "chunked": triton_chunked_errors(seed=5)}))
