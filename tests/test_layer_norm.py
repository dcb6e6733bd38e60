"""The Triton LayerNorm against F.layer_norm in float64 (CPU: Triton's interpreter in a
subprocess; GPU: compiled), on fresh random rows of odd widths, plus the module's drop-in contract."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from triton_helpers import assert_cases_within, compiled_vs_eager, max_relative_errors, needs_triton_gpu, run_under_interpreter

from defmamba.ops import layer_norm as ln

# (leading shape, channels): widths below, at and above a power of two; rows not a multiple of a tile.
CASES = [((3, 5, 7), 96), ((2, 13), 48), ((37,), 130), ((4, 3), 768), ((5,), 3)]


def max_errors(lead: tuple, cols: int, dtype: torch.dtype, device: str, seed: int, gelu: bool = False,
               scaled: bool = False) -> dict:
    """Largest relative errors of the Triton norm (``gelu``: GELU(norm); ``scaled``: of x times a
    per-image channel scale) and its gradients against float64."""
    from defmamba.ops.layer_norm import triton as kernels

    def reference(x, w, b, s=None):
        if s is not None:
            x = x * s.view(lead[:1] + (1,) * (len(lead) - 1) + (cols,))
        y = F.layer_norm(x, (cols,), w, b, 1e-5)
        return F.gelu(y) if gelu else y

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, cols, generator=g, dtype=torch.float64) * 3 + 1
    w = torch.randn(cols, generator=g, dtype=torch.float64)
    b = torch.randn(cols, generator=g, dtype=torch.float64)
    dy = torch.randn(*lead, cols, generator=g, dtype=torch.float64)
    inputs = [x.to(dtype).double(), w, b]  # the reference sees the same rounded input
    if scaled:  # positive, like the sigmoid attention it stands for
        inputs.append((torch.rand(lead[0], cols, generator=g, dtype=torch.float64) + 0.25).to(dtype).double())
    leaves = [t.clone().requires_grad_() for t in inputs]
    reference(*leaves).backward(dy)
    ref = [reference(*inputs)] + [t.grad for t in leaves]
    mine = [t.to(device=device, dtype=torch.float32 if i in (1, 2) else dtype).requires_grad_()
            for i, t in enumerate(inputs)]
    y = kernels.layer_norm_triton(mine[0], mine[1], mine[2], 1e-5, torch.float32, gelu,
                                  channel_scale=mine[3] if scaled else None)
    y.backward(dy.to(device=device, dtype=torch.float32))
    got = [y] + [t.grad for t in mine]

    return max_relative_errors(("y", "x", "weight", "bias", "scale")[:len(got)], got, ref)


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """The interpreter checks of this module's ``__main__``, run once for the tests that read them."""
    return run_under_interpreter(__file__)


def test_triton_layer_norm_matches_float64_in_interpreter(interpreted):
    errors = dict(interpreted)
    # the same kernels, via the op
    assert errors.pop("compiled vs eager") == {"compiled": 0.0, "compiled gelu": 0.0, "compiled scaled gelu": 0.0}
    errors.pop("half output")  # its own test below
    assert_cases_within(errors, 1e-5, cases=3 * len(CASES))


@pytest.mark.cuda
@needs_triton_gpu
@pytest.mark.parametrize("lead,cols", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("gelu,scaled", [(False, False), (True, False), (True, True)])
def test_triton_layer_norm_matches_float64_gpu(lead, cols, dtype, gelu, scaled):
    for name, err in max_errors(lead, cols, dtype, "cuda", seed=cols, gelu=gelu, scaled=scaled).items():
        assert err <= (1e-5 if dtype == torch.float32 else 2e-3), f"{name} off by {err:.2e}"


@pytest.mark.cuda
@needs_triton_gpu
def test_module_follows_autocast_rule_gpu():
    """Under autocast: float32 output from a half input, as autocast's own layer_norm gives."""
    module = ln.LayerNorm(96).cuda()
    x = torch.randn(4, 7, 96, device="cuda", dtype=torch.float16)
    with torch.autocast("cuda", dtype=torch.float16):
        got = module(x)
        expected = nn.LayerNorm.forward(module, x)
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@needs_triton_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_norm_feeding_a_matmul_gives_the_same_linear_output_and_gradients_gpu(dtype):
    """``feeds_matmul``: the norm's output is in the autocast dtype, and a linear layer after it
    computes bit for bit what it computes after the float32 output (which autocast rounds). The
    gradients agree to float32 summation order: the backward kernel is compiled per dtype of the
    incoming gradient (bf16/fp16 here, float32 after autocast's cast), which may reorder its sums."""
    torch.manual_seed(0)
    plain = ln.LayerNorm(96).cuda()
    nn.init.normal_(plain.weight)
    fed = ln.LayerNorm(96, feeds_matmul=True).cuda()
    fed.load_state_dict(plain.state_dict())
    linear = nn.Linear(96, 40).cuda()
    x = torch.randn(3, 7, 96, device="cuda")
    results = []
    for norm in (plain, fed):
        leaf = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=dtype):
            hidden = norm(leaf)
            out = linear(hidden)
        assert hidden.dtype == (dtype if norm is fed else torch.float32)
        out.float().square().sum().backward()
        results.append([out, leaf.grad, norm.weight.grad, norm.bias.grad])
        linear.zero_grad()
    (out_plain, *grads_plain), (out_fed, *grads_fed) = results
    torch.testing.assert_close(out_fed, out_plain, rtol=0, atol=0)
    for a, b in zip(grads_plain, grads_fed):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert "feeds_matmul=True" in repr(fed) and "feeds_matmul" not in repr(plain)


@pytest.mark.cuda
@needs_triton_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layer_norm_gelu_under_autocast_matches_pytorch_gpu(dtype):
    """layer_norm_gelu in the autocast dtype against GELU(LayerNorm(.)) in float64: within one unit
    in the last place of the dtype (subnormal spacing included), plus the float32 cancellation of
    1 + erf(x/sqrt(2)) in GELU's negative tail, which PyTorch's float32 GELU has as well (its error
    there is of the same size: about 1 % of values near 1e-6 at x = -4.7)."""
    torch.manual_seed(0)
    norm = ln.LayerNorm(96).cuda()
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = (torch.randn(4, 9, 11, 96, device="cuda") * 2).to(dtype)
    with torch.autocast("cuda", dtype=dtype):
        got = ln.layer_norm_gelu(x, norm, autocast_dtype_output=True)
    normalized = F.layer_norm(x.double(), (96,), norm.weight.double(), norm.bias.double(), norm.eps)
    exact = F.gelu(normalized)
    assert got.dtype == dtype
    finfo = torch.finfo(dtype)
    one_ulp = finfo.eps * exact.abs() + finfo.smallest_normal * finfo.eps
    float32_tail = 4 * torch.finfo(torch.float32).eps * normalized.abs()
    error = (got.double() - exact).abs()
    assert (error <= one_ulp + float32_tail).all(), float((error / (one_ulp + float32_tail)).max())


def test_channel_scale_in_the_pytorch_formulation_and_its_shape_check():
    """Off the Triton path (CPU) the channel scale multiplies the rows of each image; a scale of the
    wrong shape is a clear error."""
    torch.manual_seed(0)
    norm = ln.LayerNorm(12)
    x, scale = torch.randn(3, 4, 5, 12, dtype=torch.float64), torch.rand(3, 12, dtype=torch.float64)
    expected = F.gelu(F.layer_norm(x * scale[:, None, None, :], (12,), norm.weight.double(), norm.bias.double()))
    torch.testing.assert_close(ln.layer_norm_gelu(x, norm.double(), channel_scale=scale), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"channel_scale must be \(batch, channels\) = \(3, 12\)"):
        ln.layer_norm_gelu(x, norm, channel_scale=scale[:, :5])


def test_module_is_a_drop_in_layer_norm():
    torch.manual_seed(0)
    module = ln.LayerNorm(20)
    assert isinstance(module, nn.LayerNorm) and list(module.state_dict()) == ["weight", "bias"]
    nn.init.normal_(module.weight)
    x = torch.randn(3, 4, 20)
    torch.testing.assert_close(module(x), F.layer_norm(x, (20,), module.weight, module.bias, module.eps),
                               rtol=0, atol=0)
    torch.testing.assert_close(ln.LayerNorm((4, 20))(x), F.layer_norm(x, (4, 20)), rtol=0, atol=0)


def compiled_matches_eager() -> dict:
    """The custom-op route (taken under torch.compile) against the eager route, outputs and grads."""
    from defmamba.ops.layer_norm import triton as kernels

    def norm(x, w, b):
        return kernels.layer_norm_triton(x, w, b, 1e-5, torch.float32)

    def norm_gelu(x, w, b):
        return kernels.layer_norm_triton(x, w, b, 1e-5, torch.float32, True)

    def scaled_norm_gelu(x, w, b, s):
        return kernels.layer_norm_triton(x, w, b, 1e-5, torch.float32, True, channel_scale=s)

    inputs = (torch.randn(3, 5, 96), torch.randn(96), torch.randn(96))
    return {"compiled": compiled_vs_eager(norm, *inputs), "compiled gelu": compiled_vs_eager(norm_gelu, *inputs),
            "compiled scaled gelu": compiled_vs_eager(scaled_norm_gelu, *inputs, torch.rand(3, 96) + 0.25)}


def half_output_differences(lead: tuple, cols: int, seed: int) -> dict:
    """A float32 input normalised straight to float16 (what ``feeds_matmul`` norms give under
    autocast) against the float32 output rounded afterwards (what a linear layer's autocast cast
    did), and the backward from the float16 gradient against the backward from it in float32."""
    from defmamba.ops.layer_norm import triton as kernels

    g = torch.Generator().manual_seed(seed)
    x, w, b = (torch.randn(*lead, cols, generator=g), torch.randn(cols, generator=g), torch.randn(cols, generator=g))
    dy = torch.randn(*lead, cols, generator=g).half()
    results = {}
    for name, out_dtype, grad in (("half", torch.float16, dy), ("float32", torch.float32, dy.float())):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        y = kernels.layer_norm_triton(*leaves, 1e-5, out_dtype)
        y.backward(grad)
        results[name] = [y.half()] + [t.grad for t in leaves]
    return {key: (a.float() - r.float()).abs().max().item()
            for key, a, r in zip(("y", "x", "weight", "bias"), results["half"], results["float32"])}


def test_half_output_is_the_rounded_float32_output_in_interpreter(interpreted):
    for name, diff in interpreted["half output"].items():
        assert diff == 0.0, f"{name}: {diff}"


if __name__ == "__main__":  # the interpreter check (run by the tests above in a subprocess)
    results = {f"{lead}x{cols}{' scaled' if scaled else ''}{' gelu' if gelu else ''}":
               max_errors(lead, cols, torch.float32, "cpu", seed=i, gelu=gelu, scaled=scaled)
               for i, (lead, cols) in enumerate(CASES) for gelu, scaled in ((False, False), (True, False), (True, True))}
    results["compiled vs eager"] = compiled_matches_eager()
    results["half output"] = half_output_differences((5, 9), 96, seed=7)
    print(json.dumps(results))
