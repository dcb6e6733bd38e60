"""The Triton depthwise convolution against F.conv2d in float64 (CPU: Triton's interpreter in a
subprocess; GPU: compiled), forward and all three gradients, on fresh random inputs of odd and
non-square sizes, plus the module's drop-in contract and autocast rule."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from triton_helpers import assert_cases_within, compiled_vs_eager, max_relative_errors, needs_triton_gpu, run_under_interpreter

from defmamba.ops import depthwise_conv as dw

# (batch, channels, height, width, kernel): a kernel larger than the map, rows across two
# weight-gradient bands (> 32 rows of all images), rows wider than one 64-pixel tile, channels over
# 1–3 blocks, 48 channels (16-channel blocks).
CASES = [(2, 5, 7, 9, 3), (1, 3, 5, 4, 9), (3, 20, 6, 5, 7), (1, 70, 3, 67, 5), (2, 130, 4, 3, 3), (1, 8, 1, 1, 5),
         (1, 48, 2, 3, 9), (1, 8, 33, 2, 5)]


def max_errors(case: tuple, dtype: torch.dtype, device: str, seed: int, bias: bool = True,
               sliced: bool = False, silu: bool = False) -> dict:
    """Largest relative errors against float64. ``sliced``: x is read in place as the first C
    channels of a wider channels-last tensor (as DefMamba's DSSM reads one half of in_proj's output).
    ``silu``: the convolution's SiLU, applied by the kernel (as the DSSM runs it)."""
    from defmamba.ops.depthwise_conv import triton as kernels

    batch, channels, height, width, k = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, height, width, generator=g, dtype=torch.float64).to(dtype).double()
    w = torch.randn(channels, 1, k, k, generator=g, dtype=torch.float64).to(dtype).double()
    b = torch.randn(channels, generator=g, dtype=torch.float64).to(dtype).double() if bias else None
    dy = torch.randn(batch, channels, height, width, generator=g, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, w, b) if t is not None]
    act = F.silu if silu else (lambda t: t)
    act(F.conv2d(leaves[0], leaves[1], leaves[2] if bias else None, padding=k // 2, groups=channels)).backward(dy)
    ref = [act(F.conv2d(x, w, b, padding=k // 2, groups=channels))] + [t.grad for t in leaves]
    mine = [t.to(device=device, dtype=dtype).requires_grad_() for t in (x, w, b) if t is not None]
    if sliced:
        wide = torch.cat([mine[0].permute(0, 2, 3, 1), torch.full_like(mine[0].permute(0, 2, 3, 1)[..., :3], 1e4)], -1)
        x_in = wide[..., :channels].permute(0, 3, 1, 2)
        assert kernels.pixel_stride(x_in) == channels + 3
    else:
        x_in = mine[0].contiguous(memory_format=torch.channels_last)
    with torch.no_grad():  # without a gradient to compute, the same output (no pre-SiLU copy is kept)
        y_inference = kernels.depthwise_conv2d_triton(x_in, mine[1], mine[2] if bias else None, dtype, silu)
    y = kernels.depthwise_conv2d_triton(x_in, mine[1], mine[2] if bias else None, dtype, silu)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y_inference, y)
    y.backward(dy.to(device=device, dtype=dtype))
    got = [y] + [t.grad for t in mine]

    return max_relative_errors(("y", "x", "weight", "bias"), got, ref)


def test_triton_depthwise_conv_matches_float64_in_interpreter():
    errors = run_under_interpreter(__file__)
    assert errors.pop("compiled vs eager")["compiled"] == 0.0  # the same kernels, through the custom op
    no_bias = errors.pop("no bias")
    assert set(no_bias) == {"y", "x", "weight"} and max(no_bias.values()) <= 1e-5, no_bias
    sliced = errors.pop("sliced input")
    assert max(sliced.values()) <= 1e-5, sliced
    for name in ("silu", "silu, sliced input, no bias"):
        silu = errors.pop(name)
        assert len(silu) >= 3 and max(silu.values()) <= 1e-5, (name, silu)
    assert all(set(errs) == {"y", "x", "weight", "bias"} for errs in errors.values())
    assert_cases_within(errors, 1e-5, cases=len(CASES))


GPU_CASES = [(case, torch.float32) for case in CASES] + [
    (case, dtype) for case in [(2, 96, 20, 23, 9), (3, 64, 11, 29, 3)] for dtype in (torch.float16, torch.bfloat16)]


@pytest.mark.cuda
@needs_triton_gpu
@pytest.mark.parametrize("case,dtype", GPU_CASES)
def test_triton_depthwise_conv_matches_float64_gpu(case, dtype):
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for name, err in max_errors(case, dtype, "cuda", seed=sum(case)).items():
        assert err <= tolerance, f"{name} off by {err:.2e}"


@pytest.mark.cuda
@needs_triton_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_depthwise_conv_reads_a_channel_slice_in_place_gpu(dtype):
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}[dtype]
    for name, err in max_errors((2, 96, 20, 23, 3), dtype, "cuda", seed=5, sliced=True).items():
        assert err <= tolerance, f"{name} off by {err:.2e}"


@pytest.mark.cuda
@needs_triton_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_depthwise_conv_with_silu_matches_float64_gpu(dtype):
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for sliced in (False, True):
        for name, err in max_errors((2, 96, 20, 23, 3), dtype, "cuda", seed=11, sliced=sliced, silu=True).items():
            assert err <= tolerance, f"{name} (sliced={sliced}) off by {err:.2e}"


@pytest.mark.cuda
@needs_triton_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_silu_is_pytorchs_silu_of_the_conv_bit_for_bit_gpu(dtype):
    """The kernel's SiLU rounds as PyTorch's CUDA silu does: output and all gradients equal those of
    F.silu after the same kernel's plain convolution, bit for bit."""
    g = torch.Generator().manual_seed(3)
    x, w, b, dy = (torch.randn(*shape, generator=g).to("cuda", dtype)
                   for shape in ((2, 96, 19, 23), (96, 1, 3, 3), (96,), (2, 96, 19, 23)))
    x = x.contiguous(memory_format=torch.channels_last)
    results = []
    for fused in (True, False):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        y = dw.depthwise_conv2d_silu(*leaves) if fused else F.silu(dw.depthwise_conv2d(*leaves))
        y.backward(dy)
        results.append([y] + [t.grad for t in leaves])
    for name, got, expected in zip(("y", "x", "weight", "bias"), *results):
        assert torch.equal(got, expected), name


def test_silu_off_gpu_is_conv_then_silu():
    torch.manual_seed(0)
    x, w, b = (torch.randn(*shape, dtype=torch.float64) for shape in ((2, 6, 7, 5), (6, 1, 3, 3), (6,)))
    torch.testing.assert_close(dw.depthwise_conv2d_silu(x, w, b), F.silu(F.conv2d(x, w, b, padding=1, groups=6)),
                               rtol=0, atol=0)


@pytest.mark.cuda
@needs_triton_gpu
@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("silu", [False, True])
def test_module_follows_autocast_rule_gpu(amp, silu):
    """Under autocast: the output in the autocast dtype, equal to autocast's own convolution (and
    F.silu of it) up to the summation order of float32 accumulations; parameter gradients in float32."""
    torch.manual_seed(0)
    module = dw.DepthwiseConv2d(48, 7).cuda()
    x = torch.randn(2, 48, 13, 10, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=amp):
        got = dw.depthwise_conv2d_silu(x, module.weight, module.bias) if silu else module(x)
        expected = nn.Conv2d.forward(module, x)
        expected = F.silu(expected) if silu else expected
    assert got.dtype == expected.dtype == amp
    torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-2)
    got.float().sum().backward()
    assert module.weight.grad.dtype == module.bias.grad.dtype == torch.float32


def test_module_is_a_drop_in_conv2d():
    torch.manual_seed(0)
    module = dw.DepthwiseConv2d(6, 5)
    assert isinstance(module, nn.Conv2d) and list(module.state_dict()) == ["weight", "bias"]
    assert module.weight.shape == (6, 1, 5, 5) and module.padding == (2, 2) and module.groups == 6
    x = torch.randn(2, 6, 7, 4)
    torch.testing.assert_close(module(x), F.conv2d(x, module.weight, module.bias, padding=2, groups=6), rtol=0, atol=0)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="odd kernel size"):
        dw.DepthwiseConv2d(4, 4)
    with pytest.raises(ValueError, match=r"\(channels, 1, K, K\)"):
        dw.depthwise_conv2d(torch.randn(1, 4, 5, 5), torch.randn(4, 2, 3, 3))
    with pytest.raises(ValueError, match="x must be"):
        dw.depthwise_conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 1, 3, 3))


def compiled_matches_eager() -> dict:
    """The custom-op route (taken under torch.compile) against the eager route, outputs and grads."""
    from defmamba.ops.depthwise_conv import triton as kernels

    def conv(x, w, b):
        return kernels.depthwise_conv2d_triton(x, w, b, torch.float32)

    x = torch.randn(2, 7, 5, 6).contiguous(memory_format=torch.channels_last)
    return {"compiled": compiled_vs_eager(conv, x, torch.randn(7, 1, 3, 3), torch.randn(7))}


if __name__ == "__main__":  # the interpreter check (run by the test above in a subprocess)
    results = {"x".join(map(str, case)): max_errors(case, torch.float32, "cpu", seed=i) for i, case in enumerate(CASES)}
    results["no bias"] = max_errors(CASES[0], torch.float32, "cpu", seed=99, bias=False)
    results["sliced input"] = max_errors((2, 20, 6, 9, 5), torch.float32, "cpu", seed=7, sliced=True)
    results["silu"] = max_errors((2, 20, 7, 9, 3), torch.float32, "cpu", seed=8, silu=True)
    results["silu, sliced input, no bias"] = max_errors((1, 9, 5, 6, 5), torch.float32, "cpu", seed=9, bias=False,
                                                        sliced=True, silu=True)
    results["compiled vs eager"] = compiled_matches_eager()
    print(json.dumps(results))
