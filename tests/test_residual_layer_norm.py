"""The residual sum and LayerNorm as one op (``residual_layer_norm``, the DM block's x + DropPath(DSSM)
then norm2) against the two ops it replaces and against float64: on CPU through Triton's interpreter
in a subprocess (bit for bit), on the GPU compiled and under autocast (the sum bit for bit, the rest
to the last bits: the compiled kernels may sum a row in another order); plus its routes."""
from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from triton_helpers import max_relative_errors, needs_triton_gpu, run_under_interpreter

import defmamba  # noqa: F401  (registers the timm models)
from defmamba.models.blocks import DMBlock, ResidualDropPath
from defmamba.ops import layer_norm as ln

# (leading shape, channels): rows not a multiple of a tile, widths below, at and above a power of two.
CASES = [((2, 5, 7), 96), ((3, 13), 48), ((2, 3), 130), ((4, 2, 3), 8)]


def _inputs(lead: tuple, cols: int, seed: int, dtype: torch.dtype, branch_dtype: torch.dtype, drop: bool):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, cols, generator=g, dtype=torch.float64) * 2 + 1).to(dtype)
    branch = torch.randn(*lead, cols, generator=g, dtype=torch.float64).to(branch_dtype)
    w = torch.randn(cols, generator=g, dtype=torch.float64).float()
    b = torch.randn(cols, generator=g, dtype=torch.float64).float()
    dy = torch.randn(*lead, cols, generator=g, dtype=torch.float64)
    dsum = torch.randn(*lead, cols, generator=g, dtype=torch.float64)
    # a mask with dropped and kept images (the first image kept, the second dropped)
    kept = torch.tensor([1.0, 0.0] + [1.0] * (lead[0] - 2), dtype=branch_dtype)[:lead[0]] if drop else None
    return x, branch, w, b, dy, dsum, kept


def fused_against_separate(lead: tuple, cols: int, device: str, seed: int, drop: bool,
                           dtype: torch.dtype = torch.float32, branch_dtype: torch.dtype = torch.float32,
                           out_dtype: torch.dtype = torch.float32) -> dict:
    """The fused kernels against the drop-path and LayerNorm kernels one after the other: whether
    the sum, the norm and the four gradients are equal bit for bit, their largest difference in
    units of the result's dtype's epsilon times its largest entry, and the largest relative errors
    of the fused results against float64."""
    from defmamba.ops.drop_path import triton as drop_kernels
    from defmamba.ops.layer_norm import triton as kernels

    keep_prob = 0.75
    x, branch, w, b, dy, dsum, kept = _inputs(lead, cols, seed, dtype, branch_dtype, drop)
    kept_dev = kept.to(device) if kept is not None else None
    results = []
    for fused in (True, False):
        leaves = [t.detach().to(device).clone().requires_grad_() for t in (x, branch, w, b)]
        if fused:
            total, y = kernels.residual_layer_norm_triton(*leaves[:2], kept_dev, keep_prob, *leaves[2:], 1e-5,
                                                          out_dtype)
        else:
            total = (drop_kernels.add_dropped_path_triton(leaves[0], leaves[1], kept_dev, keep_prob) if drop
                     else leaves[0] + leaves[1])
            y = kernels.layer_norm_triton(total, leaves[2], leaves[3], 1e-5, out_dtype)
        torch.autograd.backward([y, total], [dy.to(device, y.dtype), dsum.to(device, total.dtype)])
        results.append([total, y] + [t.grad for t in leaves])
    names = ("sum", "y", "x", "branch", "weight", "bias")
    equal = {name: bool(torch.equal(a, b)) for name, a, b in zip(names, *results)}
    epsilons = {name: ((a.double() - b.double()).abs().max() / (b.double().abs().max() * torch.finfo(b.dtype).eps)).item()
                for name, a, b in zip(names, *results)}
    # float64: the same rounded inputs, the plain formula
    leaves = [t.detach().double().clone().requires_grad_() for t in (x, branch, w, b)]
    scale = (kept.double() / keep_prob).view(-1, *([1] * len(lead))) if drop else 1.0
    total = leaves[0] + leaves[1] * scale
    y = F.layer_norm(total, (cols,), leaves[2], leaves[3], 1e-5)
    torch.autograd.backward([y, total], [dy, dsum])
    errors = max_relative_errors(names, results[0], [total, y] + [t.grad for t in leaves])
    return {"equal": equal, "epsilons": epsilons, "errors": errors}


# On the GPU the compiled kernels may reduce a row in another order than the separate LayerNorm
# kernel (the register layout follows the extra loads of the fused one) and contract its last
# multiply-add with the residual gradient: last-bit differences, which a weight gradient's sum over
# thousands of rows can grow to a few epsilons of its largest entry (at most 1.74 over these cases
# on an H100, 2026-12-07). A wrong or missing term is off by its own size, 1e5 epsilons and more in
# float32.
GPU_EPSILONS = 8


def _check(result: dict, tolerance: float, bitwise: bool = True) -> None:
    if bitwise:
        assert all(result["equal"].values()), result["equal"]
    else:
        assert result["equal"]["sum"], result["equal"]  # one rounded add either way
        assert max(result["epsilons"].values()) <= GPU_EPSILONS, result["epsilons"]
    assert max(result["errors"].values()) <= tolerance, result["errors"]


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_under_interpreter(__file__)


def test_fused_equals_the_two_ops_in_interpreter(interpreted):
    assert len(interpreted) == 2 * len(CASES)
    for case, result in interpreted.items():
        assert set(result["equal"]) == {"sum", "y", "x", "branch", "weight", "bias"}, case
        _check(result, 1e-5)


@pytest.mark.cuda
@needs_triton_gpu
@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("branch_dtype,out_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                                    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
def test_fused_equals_the_two_ops_gpu(drop, branch_dtype, out_dtype):
    """The DM block's mixes: a float32 residual stream, the branch in the autocast dtype, the norm
    written in it (it feeds fc1) or in float32; the model's own widths and one odd width."""
    tolerance = 1e-5 if out_dtype == torch.float32 and branch_dtype == torch.float32 else 1e-2
    for lead, cols in [((2, 56, 56), 96), ((3, 7, 9), 384), ((2, 5), 130)]:
        _check(fused_against_separate(lead, cols, "cuda", sum(lead) + cols, drop, torch.float32, branch_dtype,
                                      out_dtype), tolerance, bitwise=False)


def _assert_same_step(fused: list, separate: list) -> None:
    """The output equal bit for bit; the gradients up to the order in which the deformable sampling's
    backward adds its float32 gradients with atomics (run to run noise, any route), which under
    autocast can flip the rounding of a half-precision value upstream: within 1 % of each
    gradient's largest entry, where a wrong or missing term would be off by its own size."""
    assert torch.equal(fused[0], separate[0])
    for i, (a, b) in enumerate(zip(fused[1:], separate[1:])):
        assert (a - b).abs().max() <= 1e-2 * b.abs().max(), i


@pytest.mark.cuda
@needs_triton_gpu
@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16])
def test_block_forward_and_backward_unchanged_gpu(amp):
    """A DM block training under autocast, stochastic depth on: the fused op gives the output of the
    drop-path op and norm2 run one after the other bit for bit (same mask), and their gradients."""
    torch.manual_seed(0)
    block = DMBlock(96, 7, drop_path=0.3).cuda().train()
    x = torch.randn(4, 14, 11, 96, device="cuda")
    results = []
    for fused in (True, False):
        block.zero_grad()
        leaf = x.clone().requires_grad_()
        torch.manual_seed(1)
        with torch.autocast("cuda", dtype=amp):
            if fused:
                out = block(leaf)
            else:
                h = block.drop_path(leaf, block.op(block.norm(leaf)))
                out = block.drop_path(h, block.mlp(block.norm2(h)))
        out.float().square().mean().backward()
        results.append([out, leaf.grad] + [p.grad.clone() for p in block.parameters()])
    _assert_same_step(*results)


def _stage_outputs_and_gradients(model: torch.nn.Module, x: torch.Tensor, per_block: bool, amp=None) -> list:
    """Output and parameter gradients of a training step, the stages' blocks chained (their fused
    residual norms) or, with a no-op hook on every block, called one by one; same random draws."""
    model.zero_grad()
    blocks = [b for stage in model.layers for b in stage.blocks] if per_block else []
    hooks = [b.register_forward_hook(lambda *args: None) for b in blocks]
    try:
        torch.manual_seed(1)
        with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            out = model(x)
        out.float().square().mean().backward()
    finally:
        for h in hooks:
            h.remove()
    return [out] + [p.grad.clone() for p in model.parameters()]


def test_chained_blocks_equal_blocks_called_one_by_one():
    torch.manual_seed(0)
    model = timm.create_model("defmamba_tiny", drop_path_rate=0.3).train()
    x = torch.randn(2, 3, 64, 96)
    for a, b in zip(_stage_outputs_and_gradients(model, x, False), _stage_outputs_and_gradients(model, x, True)):
        assert torch.equal(a, b)
    # with a hook on a block, the blocks run as module calls: the hook sees every call
    seen = []
    handle = model.layers[2].blocks[3].register_forward_hook(lambda m, args, out: seen.append(out.shape))
    model(x)
    handle.remove()
    assert seen == [(2, 4, 6, model.layers[2].blocks[3].norm.normalized_shape[0])]


@pytest.mark.cuda
@needs_triton_gpu
@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16])
def test_chained_blocks_equal_blocks_called_one_by_one_gpu(amp):
    torch.manual_seed(0)
    model = timm.create_model("defmamba_tiny", drop_path_rate=0.3).cuda().train()
    x = torch.randn(4, 3, 96, 128, device="cuda")
    chained = _stage_outputs_and_gradients(model, x, False, amp)
    _assert_same_step(chained, _stage_outputs_and_gradients(model, x, True, amp))


def test_off_gpu_it_is_the_sum_and_the_norm():
    torch.manual_seed(0)
    norm = ln.LayerNorm(12)
    nn_init = torch.nn.init
    nn_init.normal_(norm.weight), nn_init.normal_(norm.bias)
    x, branch = torch.randn(3, 4, 12), torch.randn(3, 4, 12)
    total, y = ln.residual_layer_norm(x, branch, norm)
    assert torch.equal(total, x + branch) and torch.equal(y, norm(x + branch))
    # with stochastic depth: the mask drawn as ResidualDropPath draws it, from the same generator state
    dp = ResidualDropPath(0.5).train()
    torch.manual_seed(3)
    total, y = dp.add_and_norm(x, branch, norm)
    torch.manual_seed(3)
    expected = dp(x, branch)
    assert torch.equal(total, expected) and torch.equal(y, norm(expected))


if __name__ == "__main__":  # the interpreter check (run by the test above in a subprocess)
    results = {}
    for i, (lead, cols) in enumerate(CASES):
        for drop in (False, True):
            results[f"{lead}x{cols}, drop={drop}"] = fused_against_separate(lead, cols, "cpu", i, drop)
    print(json.dumps(results))
