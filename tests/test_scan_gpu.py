"""GPU selective-scan backends against the float64 reference: forward, every gradient, edge cases.

Every GPU backend that ``available_backends("cuda")`` reports (triton, and cuda once the extension
is built) runs the same checks. Tolerances are relative L2 errors ‖out − ref‖ / ‖ref‖:

* float32 inputs, float32 outputs and gradients: 1e-4 (float32 state; measured ~1e-7);
* half inputs: the reference runs on the same half-rounded inputs upcast to float64, so the
  kernel's own error is measured; results in float32: 1e-4; results rounded to the half type
  (y with out_dtype=None, du/ddelta/dB/dC in the input dtype): one rounding of that type,
  float16 2e-3, bfloat16 1e-2.

Outputs are poisoned with NaN before each run (the caching allocator is filled with NaN, and the
triton backend also allocates its outputs NaN-filled), and every element must be finite.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from defmamba.ops.selective_scan import available_backends, resolve_backend, selective_scan
from defmamba.ops.selective_scan.reference import selective_scan_torch

GPU_BACKENDS = [b for b in available_backends("cuda") if b != "torch"] if torch.cuda.is_available() else []

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias")


def _poisoned(backend: str):
    """Fill the CUDA caching allocator with NaN so that fresh buffers start as NaN; for triton also
    make the backend allocate its outputs NaN-filled."""
    junk = torch.full((64 << 20,), float("nan"), device="cuda")  # 256 MiB of NaN returned to the cache
    del junk
    if backend == "triton":
        from defmamba.ops.selective_scan import triton as triton_backend

        return triton_backend.poison_outputs()
    return contextlib.nullcontext()


def _inputs(batch, channels, length, groups=3, n_state=16, dtype=torch.float32, softplus=True,
            with_d=True, with_bias=True, delta_scale=1.0, a_scale=1.0):
    """Random scan inputs on the GPU, in the layout the model produces (half types for u/delta/B/C)."""
    dev = "cuda"
    u = torch.randn(batch, channels, length, device=dev).to(dtype)
    if softplus:
        delta = (torch.randn(batch, channels, length, device=dev) - 1.0) * delta_scale
    else:
        delta = torch.rand(batch, channels, length, device=dev) * delta_scale
    delta = delta.to(dtype)
    A = -(torch.rand(channels, n_state, device=dev) * 2 + 0.05) * a_scale
    B = torch.randn(batch, groups, n_state, length, device=dev).to(dtype)
    C = torch.randn(batch, groups, n_state, length, device=dev).to(dtype)
    D = torch.randn(channels, device=dev) if with_d else None
    # Without softplus Δ = delta + bias must stay ≥ 0 (as in any real model): a negative Δ makes
    # exp(Δ·A) > 1 and the state grows without bound, beyond float32 but not float64.
    bias = (torch.randn(channels, device=dev) * 0.5 if softplus else torch.rand(channels, device=dev) * 0.5) \
        if with_bias else None
    return [u, delta, A, B, C, D, bias]


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite (unwritten or overflowed) elements in the result"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _run_and_compare(backend, xs, softplus, out_dtype, fwd_tol, grad_tol, autocast=False, A_is_log=False):
    """Forward + backward of ``backend`` vs the float64 reference on the same (rounded) inputs
    (with ``A_is_log``, xs[2] holds the logs and the reference takes −exp of them in float64)."""
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in xs]
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with _poisoned(backend), amp:
        y = selective_scan(*leaves, delta_softplus=softplus, out_dtype=out_dtype, backend=backend, A_is_log=A_is_log)
    expect_dtype = out_dtype or xs[0].dtype
    assert y.dtype == expect_dtype and y.shape == xs[0].shape
    ref_leaves = [x.detach().double().requires_grad_() if x is not None else None for x in xs]
    A_ref = -torch.exp(ref_leaves[2]) if A_is_log else ref_leaves[2]
    y_ref = selective_scan_torch(*ref_leaves[:2], A_ref, *ref_leaves[3:], delta_softplus=softplus)
    err = _rel(y, y_ref)
    tol = fwd_tol if y.dtype == torch.float32 else TOL[y.dtype]
    assert err <= tol, f"{backend} forward rel err {err:.2e} > {tol:.0e}"
    dy = torch.randn(y.shape, device="cuda").to(y.dtype)
    used = [(name, x, r) for name, x, r in zip(GRAD_NAMES, leaves, ref_leaves) if x is not None]
    with _poisoned(backend):
        grads = torch.autograd.grad(y, [x for _, x, _ in used], dy)
    ref_grads = torch.autograd.grad(y_ref, [r for _, _, r in used], dy.double(), allow_unused=True)
    for (name, x, r), g, gr in zip(used, grads, ref_grads):
        gr = torch.zeros_like(r) if gr is None else gr  # e.g. dA is exactly 0 at L = 1
        assert g.shape == x.shape and g.dtype == x.dtype, f"d{name}: {g.shape}/{g.dtype} vs {x.shape}/{x.dtype}"
        if gr.abs().max() == 0:
            assert torch.isfinite(g).all() and g.abs().max() <= 1e-6, f"d{name} should be 0"
            continue
        e = _rel(g, gr)
        tol = grad_tol if g.dtype == torch.float32 else TOL[g.dtype]
        assert e <= tol, f"{backend} d{name} rel err {e:.2e} > {tol:.0e}"


# (length, batch, channels, dtype, softplus, with_d, with_bias, out_dtype): few big combos.
CASES = [
    (1, 3, 48, torch.float32, True, True, True, None),
    (7, 1, 96, torch.float32, False, False, False, None),
    (49, 128, 576, torch.float32, True, True, True, None),
    (49, 3, 2304, torch.bfloat16, True, True, True, torch.float32),
    (196, 3, 1152, torch.float16, True, False, True, None),
    (196, 128, 144, torch.float32, True, True, False, None),
    (784, 3, 576, torch.bfloat16, True, True, True, None),
    (784, 1, 288, torch.float32, False, True, True, None),
    (3136, 1, 288, torch.float32, True, True, True, None),
    (3136, 3, 144, torch.bfloat16, True, True, True, torch.float32),
    (3136, 1, 96, torch.float16, False, False, False, None),
    (4097, 1, 48, torch.float32, True, True, True, None),
    (4097, 1, 48, torch.bfloat16, False, True, False, None),
    (130, 3, 120, torch.float32, True, True, True, None),  # 40 channels per group: partial channel block
    # The cuda forward saves a state every 64 steps (4 chunks of 16): last spans of 1 to 4 chunks.
    (65, 2, 96, torch.float32, True, True, True, None),
    (90, 1, 48, torch.float16, True, True, False, torch.float32),
    (100, 2, 144, torch.float32, False, True, True, None),
    (161, 2, 144, torch.bfloat16, True, True, True, None),
    # 8-byte row accesses: 16-bit rows with L % 4 == 0 but not % 8, float32 rows with L even, L % 4 != 0.
    (100, 2, 96, torch.bfloat16, True, True, True, None),
    (196, 2, 48, torch.float16, True, True, True, torch.float32),
    (102, 2, 48, torch.float32, True, False, True, None),
]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("length,batch,channels,dtype,softplus,with_d,with_bias,out_dtype", CASES)
def test_matches_float64_reference(backend, length, batch, channels, dtype, softplus, with_d, with_bias, out_dtype):
    torch.manual_seed(1000 + length + channels)
    xs = _inputs(batch, channels, length, dtype=dtype, softplus=softplus, with_d=with_d, with_bias=with_bias)
    _run_and_compare(backend, xs, softplus, out_dtype, fwd_tol=1e-4, grad_tol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("n_state,groups", [(16, 1), (5, 2), (1, 4)])
def test_other_state_sizes_and_groups(backend, n_state, groups):
    torch.manual_seed(7 + n_state)
    xs = _inputs(2, 8 * groups, 37, groups=groups, n_state=n_state)
    _run_and_compare(backend, xs, True, None, fwd_tol=1e-4, grad_tol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_large_delta_and_A_stay_finite(backend):
    """Δ up to ~50 and A down to −100: exp(Δ·A) underflows to 0, nothing overflows."""
    torch.manual_seed(3)
    xs = _inputs(2, 96, 300, softplus=True)
    xs[1] = (torch.rand_like(xs[1]) * 50).to(xs[1].dtype)  # softplus(50) = 50
    xs[2] = -torch.rand_like(xs[2]) * 100 - 1e-3
    _run_and_compare(backend, xs, True, None, fwd_tol=1e-4, grad_tol=1e-4)
    xs[1] = torch.rand_like(xs[1]) * 50  # and without softplus (Δ = delta + bias ≥ 0)
    xs[6] = xs[6].abs()
    _run_and_compare(backend, xs, False, None, fwd_tol=1e-4, grad_tol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_non_contiguous_inputs(backend):
    torch.manual_seed(5)
    batch, channels, length, groups, n = 2, 96, 67, 3, 16
    dev = "cuda"
    u = torch.randn(batch, length, channels, device=dev).transpose(1, 2)  # stride over L = channels
    delta = torch.randn(batch, channels, 2 * length, device=dev)[:, :, ::2]  # stride 2 over L
    A = -torch.rand(n, channels, device=dev).t() - 0.1  # transposed A
    B = torch.randn(batch, length, groups, n, device=dev).permute(0, 2, 3, 1)
    C = torch.randn(batch, groups, n, length + 5, device=dev)[..., 3:3 + length]  # offset slice
    D = torch.randn(2 * channels, device=dev)[::2]
    bias = torch.randn(channels, device=dev) * 0.3
    xs = [u, delta, A, B, C, D, bias]
    assert not any(x.is_contiguous() for x in (u, delta, A, B, C, D))
    _run_and_compare(backend, xs, True, None, fwd_tol=1e-4, grad_tol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif("cuda" not in GPU_BACKENDS, reason="the CUDA extension is not built")
@pytest.mark.parametrize("length", [16, 64, 65, 3136])
def test_cuda_forward_saves_a_state_every_64_steps(length):
    """The backward's memory: the float32 states kept by the forward are one per 64 steps."""
    from defmamba.ops.selective_scan.cuda import STATE_INTERVAL

    torch.manual_seed(length)
    batch, channels = 2, 96
    xs = [x.requires_grad_() if x is not None else None for x in _inputs(batch, channels, length)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = selective_scan(*xs, delta_softplus=True, backend="cuda")
    states = [t for t in saved if t.dtype == torch.float32 and t.dim() == 4 and t.shape[:2] == (batch, channels)]
    assert STATE_INTERVAL == 64
    assert [tuple(t.shape) for t in states] == [(batch, channels, -(-length // 64), 16)]
    y.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in xs if x is not None)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_repeated_runs_are_stable(backend):
    """Same inputs twice: the forward is bitwise identical (no races); gradients agree to rounding."""
    torch.manual_seed(11)
    xs = [x.requires_grad_() if x is not None else None for x in _inputs(3, 288, 513)]
    outs = []
    for _ in range(2):
        y = selective_scan(*xs, delta_softplus=True, backend=backend)
        g = torch.autograd.grad(y, [xs[0], xs[3]], torch.ones_like(y))
        outs.append((y.detach(), *g))
    assert torch.equal(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1:], outs[1][1:]):
        assert _rel(a, b) < 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch.manual_seed(13)
    xs = [x.requires_grad_() if x is not None else None for x in _inputs(2, 48, 50)]

    # The backend function itself (the registered custom op) inside the compiled region.
    _, fn = resolve_backend(backend, torch.device("cuda"))

    def f(u, delta, A, B, C, D, bias):
        y = fn(u, delta, A, B, C, D, bias, True, None)
        return (y * y).sum()

    compiled = torch.compile(f, fullgraph=True)
    loss_c = compiled(*xs)
    grads_c = torch.autograd.grad(loss_c, xs)
    loss_e = f(*xs)
    grads_e = torch.autograd.grad(loss_e, xs)
    assert _rel(loss_c.detach(), loss_e.detach()) < 1e-6
    for gc, ge in zip(grads_c, grads_e):
        assert _rel(gc, ge) < 1e-6


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_autocast_inputs(backend):
    """Under autocast the model feeds half u/delta/B/C with float32 A/D/bias; gradients keep dtypes."""
    torch.manual_seed(17)
    xs = _inputs(2, 96, 100, dtype=torch.bfloat16)
    _run_and_compare(backend, xs, True, torch.float32, fwd_tol=1e-4, grad_tol=1e-4, autocast=True)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype,out_dtype,autocast,n_state", [
    (torch.float32, None, False, 16), (torch.float16, None, False, 5), (torch.bfloat16, torch.float32, True, 16),
    (torch.bfloat16, None, False, 7),
])
def test_A_as_logs(backend, dtype, out_dtype, autocast, n_state):
    """A_is_log, as the model calls the scan: A = −exp(A_logs) (float32 A_logs), the logs' gradient."""
    torch.manual_seed(19 + n_state)
    xs = _inputs(2, 96, 197, n_state=n_state, dtype=dtype)
    xs[2] = torch.log(-xs[2])
    _run_and_compare(backend, xs, True, out_dtype, fwd_tol=1e-4, grad_tol=1e-4, autocast=autocast, A_is_log=True)


@pytest.mark.cuda
@pytest.mark.skipif("triton" not in GPU_BACKENDS, reason="the triton backend is not available")
def test_triton_rejects_float64_with_a_clear_message():
    from defmamba.ops.selective_scan.triton import selective_scan_triton

    xs = _inputs(1, 6, 5)
    xs[0] = xs[0].double()
    with pytest.raises(TypeError, match="float64.*backend='torch'"):
        selective_scan_triton(*xs)


def test_triton_module_imports_and_says_why_it_cannot_run():
    """Runs everywhere: the module imports without a GPU, and is_available() explains itself."""
    from defmamba.ops.selective_scan import triton as triton_backend

    ok, why = triton_backend.is_available()
    assert isinstance(ok, bool) and isinstance(why, str)
    assert ok == (why == "")
    if not torch.cuda.is_available():
        assert not ok and why
        u = torch.randn(1, 3, 4)
        B = torch.randn(1, 3, 16, 4)
        with pytest.raises(RuntimeError, match="triton"):
            selective_scan(u, u, -torch.rand(3, 16), B, B, backend="triton")
