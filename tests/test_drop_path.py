"""x + DropPath(branch) as one op (defmamba.ops.drop_path): its Triton kernels against the plain ops
with the same mask (CPU: Triton's interpreter in a subprocess; GPU: compiled, the mask drawn from
the same seed), on odd shapes and every dtype mix of the model; the op's argument check."""
from __future__ import annotations

import json

import pytest
import torch
from triton_helpers import compiled_vs_eager, needs_triton_gpu, run_under_interpreter

from defmamba.ops.drop_path import add_dropped_path, add_dropped_path_reference

# (shape, x dtype, branch dtype, keep probability): odd sizes, one sample, a block remainder; the
# residual stream in float32 with a half-precision branch (autocast), and one dtype throughout.
CASES = [((5, 3, 7, 11), torch.float32, torch.float16, 0.7), ((1, 9, 13, 4), torch.float32, torch.float32, 0.9),
         ((3, 2050), torch.float16, torch.float16, 0.8)]
# bfloat16 only on the GPU: Triton's interpreter truncates float32 to bfloat16, the GPU rounds to nearest
GPU_CASES = CASES + [((6, 17, 5, 40), torch.float32, torch.bfloat16, 0.55), ((7, 3, 9), torch.bfloat16, torch.bfloat16, 0.6),
                     ((128, 56, 56, 96), torch.float32, torch.float16, 0.9)]


def kernel_deviations(case: tuple, device: str, seed: int) -> dict:
    """For one case, the largest differences between the kernels and the plain ops given the same
    mask: the sum, and the two gradients (x's, the branch's); with their dtypes checked."""
    from defmamba.ops.drop_path import add_dropped_path_triton

    shape, x_dtype, branch_dtype, keep = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(device=device, dtype=x_dtype)
    branch = torch.randn(shape, generator=g).to(device=device, dtype=branch_dtype)
    kept = (torch.rand(shape[0], generator=g) < keep).to(device=device, dtype=branch_dtype)
    kept[0] = 1  # at least one sample kept and, with 2+ samples, one dropped
    if shape[0] > 1:
        kept[1] = 0
    grad = torch.randn(shape, generator=g).to(device=device, dtype=torch.promote_types(x_dtype, branch_dtype))
    results = {}
    for name, fn in (("kernels", add_dropped_path_triton), ("plain", add_dropped_path_reference)):
        leaves = [x.clone().requires_grad_(), branch.clone().requires_grad_()]
        out = fn(*leaves, kept, keep)
        out.backward(grad)
        results[name] = [out, leaves[0].grad, leaves[1].grad]
    for a, b in zip(results["kernels"], results["plain"]):
        assert a.dtype == b.dtype and a.shape == b.shape
    return {name: (a.double() - b.double()).abs().max().item() / max(b.double().abs().max().item(), 1e-30)
            for name, a, b in zip(("sum", "d x", "d branch"), results["kernels"], results["plain"])}


def compiled_matches_eager() -> float:
    """The custom-op route (torch.compile) against the eager route of the kernels, for one mask."""
    from defmamba.ops.drop_path import add_dropped_path_triton

    kept = torch.tensor([1.0, 0.0, 1.0, 1.0])

    def add(x, branch):
        return add_dropped_path_triton(x, branch, kept, 0.6)

    g = torch.Generator().manual_seed(2)
    return compiled_vs_eager(add, torch.randn(4, 3, 5, generator=g), torch.randn(4, 3, 5, generator=g))


def _within_rounding(deviations: dict, case: tuple) -> None:
    """The sum within one rounding of its dtype (the kernel may fuse the product into the sum, the
    plain ops may not); the gradients exact: the same product, rounded the same way."""
    out_dtype = torch.promote_types(case[1], case[2])
    assert deviations["sum"] <= torch.finfo(out_dtype).eps, deviations
    assert deviations["d x"] == 0.0 and deviations["d branch"] == 0.0, deviations


def test_kernels_match_the_plain_ops_in_interpreter():
    results = run_under_interpreter(__file__)
    assert results.pop("compiled vs eager") == 0.0
    assert len(results) == len(CASES)
    for case, deviations in zip(CASES, results.values()):
        _within_rounding(deviations, case)


def test_keep_probability_is_checked():
    with pytest.raises(ValueError, match=r"keep_prob must be in \(0, 1\], got 0.0"):
        add_dropped_path(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)


@pytest.mark.cuda
@needs_triton_gpu
@pytest.mark.parametrize("case", GPU_CASES)
def test_kernels_match_the_plain_ops_gpu(case):
    _within_rounding(kernel_deviations(case, "cuda", seed=3), case)


@pytest.mark.cuda
@needs_triton_gpu
def test_same_masks_as_the_plain_ops_from_one_seed_gpu():
    """The op draws its mask as timm's DropPath does: from the same seed, the kernel route and the
    plain route (forced by reference_only) drop the same samples."""
    from defmamba.ops import reference_only

    x = torch.randn(64, 7, 7, 32, device="cuda")
    branch = torch.randn(64, 7, 7, 32, device="cuda", dtype=torch.float16)
    torch.manual_seed(7)
    fast = add_dropped_path(x, branch, 0.5)
    torch.manual_seed(7)
    with reference_only("drop_path"):
        plain = add_dropped_path(x, branch, 0.5)
    torch.testing.assert_close(fast, plain, rtol=torch.finfo(torch.float32).eps, atol=1e-6)
    kept = ((fast - x).flatten(1).abs().amax(1) > 0)
    assert 0 < kept.sum() < 64


if __name__ == "__main__":  # the interpreter check (run by the tests above in a subprocess)
    results = {str(i): kernel_deviations(case, "cpu", seed=i) for i, case in enumerate(CASES)}
    results["compiled vs eager"] = compiled_matches_eager()
    print(json.dumps(results))
