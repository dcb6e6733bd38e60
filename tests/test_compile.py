"""torch.compile: the selective scan and a DM block compile without graph breaks
(``fullgraph=True``), the whole model compiles, and all give the eager outputs and gradients.

CPU tests use the torch scan backend with Inductor (C++ code generation); the GPU tests run
every backend available on the card. Sizes are small and odd (L = 13, a 4×5 map, a 64×72
image) so the unrolled scan and the compiled kernels stay quick to build.
"""
from __future__ import annotations

import pytest
import torch

import defmamba
from defmamba.models.blocks import DMBlock
from defmamba.ops import selective_scan
from defmamba.ops.selective_scan import available_backends

RTOL, ATOL = 1e-4, 1e-5  # float32 state: compiled code may reorder sums


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _scan_inputs(device: str, batch: int = 2, groups: int = 3, channels: int = 8, n_state: int = 4, length: int = 13):
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    inputs = dict(u=rand(batch, groups * channels, length), delta=0.5 * rand(batch, groups * channels, length),
                  A=-torch.rand(groups * channels, n_state, generator=g) - 0.1, B=rand(batch, groups, n_state, length),
                  C=rand(batch, groups, n_state, length), D=rand(groups * channels),
                  delta_bias=0.1 * rand(groups * channels))
    return {k: v.to(device).requires_grad_() for k, v in inputs.items()}


def _check_scan_compiles(backend: str, device: str) -> None:
    def scan(u, delta, A, B, C, D, delta_bias):
        return selective_scan(u, delta, A, B, C, D, delta_bias, delta_softplus=True, backend=backend)

    inputs = _scan_inputs(device)
    expected = scan(**inputs)
    expected_grads = torch.autograd.grad(expected.square().sum(), list(inputs.values()))
    compiled = torch.compile(scan, fullgraph=True)
    got = compiled(**inputs)
    got_grads = torch.autograd.grad(got.square().sum(), list(inputs.values()))
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    for name, g_got, g_expected in zip(inputs, got_grads, expected_grads):
        torch.testing.assert_close(g_got, g_expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"grad of {name}: {m}")


def _block(device: str, backend: str) -> DMBlock:
    torch.manual_seed(0)
    return DMBlock(16, deform_kernel_size=5, scan_backend=backend).to(device)


def test_block_order_is_not_raster():
    """Guard on the block comparisons: the deformable order really permutes the tokens."""
    block = _block("cpu", "torch")
    orders = []
    handle = block.op.DS.register_forward_hook(lambda module, inputs, output: orders.append(output.order))
    with torch.no_grad():
        block(torch.randn(2, 4, 5, 16))
    handle.remove()
    assert (orders[0] != torch.arange(20)).sum(dim=1).min() > 5


def test_scan_op_compiles_fullgraph_cpu():
    _check_scan_compiles("torch", "cpu")


def test_block_compiles_fullgraph_cpu_eval():
    block = _block("cpu", "torch").eval()
    x = torch.randn(2, 4, 5, 16)
    with torch.no_grad():
        expected = block(x)
        got = torch.compile(block, fullgraph=True)(x)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)


def test_block_compiles_fullgraph_cpu_train():
    """Training path: the path ordering's custom autograd Function is captured without a break,
    and the compiled backward gives the eager gradients (including the surrogate path gradient)."""
    block = _block("cpu", "torch").train()
    x = torch.randn(2, 4, 5, 16, requires_grad=True)
    params = [x] + list(block.parameters())
    expected = block(x)
    expected_grads = torch.autograd.grad(expected.square().sum(), params)
    got = torch.compile(block, fullgraph=True, backend="aot_eager")(x)
    got_grads = torch.autograd.grad(got.square().sum(), params)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    for g_got, g_expected in zip(got_grads, expected_grads):
        torch.testing.assert_close(g_got, g_expected, rtol=RTOL, atol=ATOL)


def test_model_compiles_fullgraph_cpu():
    torch.manual_seed(0)
    model = defmamba.DefMamba(dims=16, depths=(1, 1, 1, 1), num_classes=10, scan_backend="torch").eval()
    x = torch.randn(2, 3, 64, 72)
    with torch.no_grad():
        expected = model(x)
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)


def _gpu_backends() -> list[str]:
    return available_backends("cuda") if torch.cuda.is_available() else ["triton"]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", _gpu_backends())
def test_scan_op_compiles_fullgraph_gpu(backend):
    _check_scan_compiles(backend, "cuda")


def _block_backends_gpu() -> list:
    """The GPU backends; the pure-PyTorch scan is an expected failure here (see the reason)."""
    reason = ("known, not yet explained: on an H100 (torch 2.11) the block compiled with the pure-PyTorch scan, "
              "which Inductor compiles itself, gave gradients 2.1e-4 and 1.1e-3 of their largest entry away from "
              "eager mode in two runs, at 57bd4c7 as well; on CPU, Inductor's compile of the same block agrees "
              "with eager within 1e-6 and both with float64. Cause not found; not near-ties of the path order "
              "(its smallest gap is about 3e-4 on these inputs, far above float32 differences)")
    return [pytest.param(b, marks=pytest.mark.xfail(strict=False, reason=reason)) if b == "torch" else b
            for b in _gpu_backends()]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", _block_backends_gpu())
def test_block_compiles_fullgraph_gpu(backend):
    """Default (Inductor) compilation on the GPU: outputs and the gradients of the input and of
    every parameter match eager mode. An odd 7×9 map: at this size a corrupted gradient into the
    scan op (from the backward of the token gather) once showed, while 4×5 hid it."""
    block = _block("cuda", backend).train()
    x = torch.randn(2, 7, 9, 16, device="cuda", requires_grad=True)
    params = [x] + list(block.parameters())
    expected = block(x)
    expected_grads = torch.autograd.grad(expected.square().sum(), params)
    got = torch.compile(block, fullgraph=True)(x)
    got_grads = torch.autograd.grad(got.square().sum(), params)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)
    names = ["x"] + [name for name, _ in block.named_parameters()]
    for name, g_got, g_expected in zip(names, got_grads, expected_grads):
        error = ((g_got - g_expected).abs().max() / g_expected.abs().max().clamp_min(1e-30)).item()
        assert error <= 1e-4, f"grad of {name}: max error {error:.2e} of its largest entry"


@pytest.mark.cuda
@pytest.mark.xfail(strict=True, reason="known defect: on an H100 with torch 2.11, Inductor fails an internal assertion "
                   "of its tiling analysis (tiling_utils.get_pw_red_splits, pytorch/pytorch#197077) when compiling "
                   "the backward; main.py refuses --compile for GPU training until this passes")
def test_model_training_step_compiles_gpu():
    """A whole model (Small's width, one block per stage) compiled with Inductor on the GPU under
    bf16 autocast, as it trains: logits and every parameter gradient match eager mode within
    bf16 rounding, on a non-square input (3×2 and 2×1 maps in the last stages). A layout defect
    corrupts gradients by O(1), far above this tolerance. One scan backend (the default): the
    backends are opaque ops to Inductor and the rest of the graph is the same, and one
    compilation of the model's training graph takes minutes."""
    torch.manual_seed(0)
    model = defmamba.DefMamba(dims=96, depths=(1, 1, 1, 1), num_classes=10, drop_path_rate=0.0).cuda().train()
    x = torch.randn(2, 3, 96, 64, device="cuda")
    params = [p for p in model.parameters()]

    def step(fn):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fn(x).float()
        return out, torch.autograd.grad(out.square().sum(), params)

    expected, expected_grads = step(model)
    got, got_grads = step(torch.compile(model))
    torch.testing.assert_close(got, expected, rtol=3e-2, atol=3e-2)
    for (name, _), g_got, g_expected in zip(model.named_parameters(), got_grads, expected_grads):
        error = ((g_got - g_expected).abs().max() / g_expected.abs().max().clamp_min(1e-30)).item()
        assert error <= 5e-2, f"grad of {name}: max error {error:.2e} of its largest entry"


# ---------------------------------------------------------------- regional compilation (token mixers)

def _regional_pair(device: str, backend: str, **kwargs) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Two equal models (a non-square input gives every stage its own map shape), the second with
    its DSSMs compiled in place."""
    torch.manual_seed(0)
    spec = dict(num_classes=10, drop_path_rate=0.0, scan_backend=backend) | kwargs
    eager = defmamba.DefMamba(**spec).to(device).train()
    compiled = defmamba.DefMamba(**spec).to(device).train()
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


def _train_outputs(model: torch.nn.Module, x: torch.Tensor, dtype=None) -> tuple[torch.Tensor, list]:
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        out = model(x).float()
    return out, list(torch.autograd.grad(out.square().sum(), list(model.parameters())))


def test_regional_compile_shares_one_graph_per_stage_and_keeps_keys():
    """CPU, AOT autograd without Inductor (quick): every DSSM compiles without a graph break, the
    blocks of a stage share one graph (4 graphs for 4 stages, none per block), the state-dict keys
    stay the checkpoints' keys, and outputs and gradients are the eager ones."""
    from torch._dynamo.utils import counters

    from defmamba.regional_compile import compile_token_mixers

    eager, compiled = _regional_pair("cpu", "torch", dims=16, depths=(2, 1, 3, 1), d_state=4)
    keys = list(compiled.state_dict())
    counters.clear()
    assert compile_token_mixers(compiled, backend="aot_eager") == 7
    assert list(compiled.state_dict()) == keys
    x = torch.randn(2, 3, 72, 56)
    got, got_grads = _train_outputs(compiled, x)
    assert counters["stats"]["unique_graphs"] == 4
    expected, expected_grads = _train_outputs(eager, x)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    for (name, _), g_got, g_expected in zip(eager.named_parameters(), got_grads, expected_grads):
        torch.testing.assert_close(g_got, g_expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"grad of {name}: {m}")


def test_regional_compile_refuses_a_model_without_token_mixers():
    from defmamba.regional_compile import compile_token_mixers

    with pytest.raises(ValueError, match="holds no DefMamba token mixer"):
        compile_token_mixers(torch.nn.Linear(2, 2))


def _relative_errors(grads: list, reference: list) -> list[float]:
    """Largest deviation of each gradient from the reference's, as a fraction of its largest entry."""
    return [((g.double().cpu() - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
            for g, r in zip(grads, reference)]


def _kernel_backends_gpu() -> list[str]:
    """The GPU scan backends that run kernels: what ``backend="auto"`` picks on a GPU, so what
    main.py --compile trains with. The pure-PyTorch scan compiled on the GPU is the block test's
    known deviation (expected failure above); compiled for a whole model it took more than 7
    minutes on an H100 (2026-12-07) without ending, longer than a GPU test may take."""
    return [b for b in _gpu_backends() if b != "torch"]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", _kernel_backends_gpu())
def test_regional_compile_training_matches_eager_gpu(backend):
    """Inductor on the GPU, each DSSM compiled (what main.py --compile does for GPU training): a model
    of Small's width, one block per stage, on a non-square input, in float32 and under bf16 autocast.
    Both the compiled and the eager gradients are measured against the same model in float64 on the
    CPU (PyTorch formulation): compiled code may reorder sums, so it must be as close to the
    float64 values as eager mode is (within 4× of eager's error plus float32 rounding; bf16: 2×
    plus 1e-3). TF32 is off: cuDNN's TF32 convolutions alone differ from run to run by ~4e-4 of
    the stem's weight gradient. A wrong gradient is off by O(1)."""
    from defmamba.regional_compile import compile_token_mixers

    eager, compiled = _regional_pair("cuda", backend, dims=96, depths=(1, 1, 1, 1))
    reference = defmamba.DefMamba(dims=96, depths=(1, 1, 1, 1), num_classes=10, drop_path_rate=0.0,
                                  scan_backend="torch").double().train()
    reference.load_state_dict(eager.state_dict())
    compile_token_mixers(compiled)
    x = torch.randn(2, 3, 96, 64, device="cuda")
    expected, expected_grads = _train_outputs(reference, x.double().cpu())
    names = [name for name, _ in eager.named_parameters()]
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False, allow_tf32=False):
        for dtype, factor, floor in ((None, 4.0, 1e-5), (torch.bfloat16, 2.0, 1e-3)):
            got, got_grads = _train_outputs(compiled, x, dtype)
            eager_out, eager_grads = _train_outputs(eager, x, dtype)
            (out_error, eager_out_error) = _relative_errors([got, eager_out], [expected, expected])
            assert out_error <= factor * eager_out_error + floor, \
                f"{dtype}: logits {out_error:.2e} of their largest entry, eager {eager_out_error:.2e}"
            for name, error, eager_error in zip(names, _relative_errors(got_grads, expected_grads),
                                                _relative_errors(eager_grads, expected_grads)):
                assert error <= factor * eager_error + floor, \
                    f"{dtype}: grad of {name}: compiled {error:.2e}, eager {eager_error:.2e} of its largest entry"
