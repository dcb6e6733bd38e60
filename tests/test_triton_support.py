"""The Triton availability check that the op dispatch asks: never while torch.jit traces."""
from __future__ import annotations

import torch

from defmamba.ops import triton_support


def test_ready_is_false_while_tracing(monkeypatch):
    """fvcore's FLOP count and ONNX export trace the model: they must get the PyTorch formulations
    even where the Triton kernels could run."""
    monkeypatch.setattr(triton_support, "_ready", True)  # as on a GPU machine
    assert triton_support.ready()
    seen = []

    def probe(x):
        seen.append(triton_support.ready())
        return x * 2

    torch.jit.trace(probe, torch.ones(3), check_trace=False)
    assert seen == [False]
    assert triton_support.ready()
