"""Shared by the tests of the Triton ops: the GPU skip condition and the interpreter run on CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from defmamba.ops import triton_support

needs_triton_gpu = pytest.mark.skipif(not triton_support.is_available()[0], reason=triton_support.is_available()[1])


def run_under_interpreter(script: str) -> dict:
    """Run ``script`` (a test module's ``__main__`` check) with TRITON_INTERPRET=1, which Triton
    reads when kernels are defined, so in a fresh process; return the JSON it prints last.

    The interpreter (Triton 3.8) truncates a float32 → bfloat16 conversion inside a kernel
    (``.to(tl.bfloat16)``, even with ``fp_downcast_rounding="rtne"``) where compiled kernels round
    to nearest even: bit-exact checks of such rounding belong in the GPU tests (float16 rounds
    correctly under the interpreter)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def max_relative_errors(names: tuple[str, ...], got: list, reference: list) -> dict[str, float]:
    """Per name: the largest deviation of ``got`` (any device and dtype) from the float64 CPU
    ``reference``, relative to the reference's largest entry."""
    return {name: ((a.double().cpu() - b).abs().max() / b.abs().max()).item()
            for name, a, b in zip(names, got, reference)}


def assert_cases_within(errors: dict[str, dict[str, float]], tolerance: float, cases: int) -> None:
    """``errors`` (case → output name → relative error, as the interpreter checks print them) has
    ``cases`` entries, and every error is at most ``tolerance``."""
    assert len(errors) == cases, f"expected {cases} cases, got {sorted(errors)}"
    for case, errs in errors.items():
        for name, err in errs.items():
            assert err <= tolerance, f"{case}: {name} off by {err:.2e} of its largest entry"


def compiled_vs_eager(fn, *inputs) -> float:
    """Largest difference between ``fn`` and ``torch.compile(fn)`` (aot_eager, full graph, so a
    custom op's route) in the output and the gradients of every input, under a fixed weighting."""
    import torch

    def outputs_and_grads(f):
        leaves = [t.clone().requires_grad_() for t in inputs]
        y = f(*leaves)
        (y * torch.arange(y.numel()).reshape(y.shape).sin()).sum().backward()
        return [y] + [t.grad for t in leaves]

    eager = outputs_and_grads(fn)
    compiled = outputs_and_grads(torch.compile(fn, backend="aot_eager", fullgraph=True))
    return max((a - e).abs().max().item() for a, e in zip(compiled, eager))
