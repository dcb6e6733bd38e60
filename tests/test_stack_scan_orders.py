"""stack_scan_orders: the Triton kernels give exactly the PyTorch formulation (flip, transposing
copies, stack; backward: flip, add, transposing copies), values and gradients, on odd and
non-square sizes in float32, float16 and a mixed pair (CPU: Triton's interpreter in a subprocess;
GPU: compiled), plus the shape checks."""
from __future__ import annotations

import json

import pytest
import torch
from triton_helpers import compiled_vs_eager, needs_triton_gpu, run_under_interpreter

from defmamba.ops import scan_orders

# (batch, channels, h, w): channels below and above one 32-channel tile, lengths below and above
# one 64-token tile (and not a multiple of it), a 1-pixel axis.
CASES = [(2, 5, 5, 7), (1, 33, 13, 11), (3, 40, 1, 9), (2, 64, 9, 8)]
DTYPES = {"float32": (torch.float32, torch.float32), "float16": (torch.float16, torch.float16),
          "float16 map, float32 sequence": (torch.float16, torch.float32)}


def pytorch_formulation(x_map: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
    raster = x_map.flatten(2)
    return torch.stack((raster, raster.flip(-1), sequence.transpose(1, 2).to(raster.dtype)), dim=1)


def differences(case: tuple, map_dtype: torch.dtype, seq_dtype: torch.dtype, device: str, seed: int) -> dict:
    """Largest absolute differences, Triton against the PyTorch formulation: output and both gradients."""
    from defmamba.ops.scan_orders import triton as kernels

    batch, channels, h, w = case
    g = torch.Generator().manual_seed(seed)
    x_map = torch.randn(batch, channels, h, w, generator=g).to(device=device, dtype=map_dtype)
    x_map = x_map.contiguous(memory_format=torch.channels_last)
    sequence = torch.randn(batch, h * w, channels, generator=g).to(device=device, dtype=seq_dtype)
    grad = torch.randn(batch, 3, channels, h * w, generator=g).to(device=device, dtype=map_dtype)
    results = []
    for fn in (pytorch_formulation,
               lambda m, s: kernels.stack_scan_orders_triton(m.permute(0, 2, 3, 1).reshape(batch, h * w, channels), s)):
        leaves = [x_map.detach().clone().requires_grad_(), sequence.detach().clone().requires_grad_()]
        xs = fn(*leaves)
        xs.backward(grad)
        results.append([xs] + [t.grad for t in leaves])
    (ref, *ref_grads), (mine, *my_grads) = results
    assert mine.shape == ref.shape and mine.dtype == ref.dtype
    assert [t.dtype for t in my_grads] == [map_dtype, seq_dtype]
    return {name: (a.float() - b.float()).abs().max().item()
            for name, a, b in zip(("xs", "map", "sequence"), [mine] + my_grads, [ref] + ref_grads)}


def compiled_matches_eager() -> float:
    """The custom-op route (taken under torch.compile) against the eager route, outputs and grads."""
    from defmamba.ops.scan_orders import triton as kernels

    return compiled_vs_eager(kernels.stack_scan_orders_triton, torch.randn(2, 35, 12), torch.randn(2, 35, 12))


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_under_interpreter(__file__)


def test_triton_kernels_are_the_pytorch_formulation_in_interpreter(interpreted):
    results = dict(interpreted)
    assert results.pop("compiled vs eager") == 0.0
    assert len(results) == len(CASES) * len(DTYPES)
    for case, diffs in results.items():
        assert diffs == {"xs": 0.0, "map": 0.0, "sequence": 0.0}, case


@pytest.mark.cuda
@needs_triton_gpu
@pytest.mark.parametrize("case", CASES + [(4, 192, 28, 28)])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.float16, torch.float32)])
def test_triton_kernels_are_the_pytorch_formulation_gpu(case, dtypes):
    assert differences(case, *dtypes, "cuda", seed=sum(case)) == {"xs": 0.0, "map": 0.0, "sequence": 0.0}


def test_off_gpu_it_is_the_pytorch_formulation():
    x_map = torch.randn(2, 6, 3, 5).contiguous(memory_format=torch.channels_last)
    sequence = torch.randn(2, 15, 6)
    torch.testing.assert_close(scan_orders.stack_scan_orders(x_map, sequence), pytorch_formulation(x_map, sequence),
                               rtol=0, atol=0)


@pytest.mark.parametrize("x_shape,seq_shape", [((2, 6, 3, 5), (2, 14, 6)), ((2, 6, 3, 5), (2, 15, 7)),
                                               ((2, 6, 15), (2, 15, 6))])
def test_wrong_shapes_are_clear_errors(x_shape, seq_shape):
    with pytest.raises(ValueError, match="must be"):
        scan_orders.stack_scan_orders(torch.zeros(x_shape), torch.zeros(seq_shape))


if __name__ == "__main__":  # the interpreter check (run by the test above in a subprocess)
    results = {"compiled vs eager": compiled_matches_eager()}
    for i, case in enumerate(CASES):
        for name, (map_dtype, seq_dtype) in DTYPES.items():
            results[f"{case} {name}"] = differences(case, map_dtype, seq_dtype, "cpu", seed=i)
    print(json.dumps(results))
