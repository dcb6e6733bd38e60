"""Every parameter's gradient comes back in its parameter's layout (the same strides) on the kernel
routes, the GPU's: DistributedDataParallel copies each gradient into a bucket view with the
parameter's strides and warns at the first step when they differ ("Grad strides do not match
bucket view strides"), as a 1×1 conv of a channels-last input makes them differ in its weight's
size-1 dims. On the CPU (the PyTorch formulations), F.conv2d's own layout rules apply."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from triton_helpers import run_under_interpreter

REPO = Path(__file__).resolve().parents[1]


def _mismatched(model: torch.nn.Module) -> list[str]:
    """The parameters whose gradient is missing or has other strides than the parameter."""
    return [f"{name}: {tuple(p.stride())} vs {None if p.grad is None else tuple(p.grad.stride())}"
            for name, p in model.named_parameters() if p.grad is None or p.grad.stride() != p.stride()]


def _tiny():
    from defmamba import DefMamba

    return DefMamba(dims=32, depths=(1, 1, 1, 1), num_classes=10)


def test_gradients_have_their_parameters_strides_on_the_kernel_routes():
    report = run_under_interpreter(__file__)
    assert report["parameters"] > 50
    assert report["kernel_launches"] > 0, "the kernel routes were not taken"
    assert report["mismatched"] == {"float32": [], "bfloat16": []}


@pytest.mark.cuda
@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16, torch.float16])
def test_gradients_have_their_parameters_strides_on_the_gpu(amp_dtype):
    torch.manual_seed(0)
    model = _tiny().cuda().train()
    with torch.autocast("cuda", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        loss = model(torch.randn(2, 3, 64, 96, device="cuda")).float().square().mean()
    loss.backward()
    assert _mismatched(model) == []


if __name__ == "__main__":  # along the GPU routes on CPU tensors (run by the test above in a subprocess)
    sys.path.insert(0, str(REPO / "tools"))
    from count_launches import LaunchCounter, gpu_routes_on_cpu  # sets TRITON_INTERPRET before the library loads

    mismatched, launches = {}, 0
    for name, dtype in (("float32", None), ("bfloat16", torch.bfloat16)):
        torch.manual_seed(0)
        model = _tiny().train()
        counter = LaunchCounter()
        with gpu_routes_on_cpu(counter), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            model(torch.randn(2, 3, 64, 96)).float().square().mean().backward()
        launches += sum(n for phase in counter.by_op.values() for op, n in phase.items() if op.startswith("triton::"))
        mismatched[name] = _mismatched(model)
    print(json.dumps({"parameters": len(list(model.parameters())), "kernel_launches": launches,
                      "mismatched": mismatched}))
