"""tools/forward_traffic.py: the GPU route traced on fake CUDA tensors, on a CPU-only machine."""
from __future__ import annotations

import torch
from tool_helpers import load_tool

from defmamba.ops import dispatch


def test_traces_the_gpu_route_and_counts_bytes(capsys):
    tool = load_tool("forward_traffic")
    ready_before, cuda_before = dispatch._kernels_ready, torch.cuda.is_available()
    calls = tool.forward_traffic("defmamba_tiny", batch_size=2, image_size=64, amp=torch.bfloat16)
    names = {name for name, _, _ in calls}
    # The Triton ops of the GPU route, through their custom ops.
    for op in ("layer_norm_fwd", "depthwise_conv2d_fwd", "deformable_sampling_fwd", "stack_scan_orders_fwd",
               "merge_and_gate_fwd"):
        assert f"defmamba.{op}" in names, sorted(names)
    assert any(name.startswith("defmamba.selective_scan") for name in names)
    # stack_scan_orders reads the map and the sequence (B, L, D) and writes three of them: 3/2 of its reads.
    stacks = [(read, written) for name, read, written in calls if name == "defmamba.stack_scan_orders_fwd"]
    assert len(stacks) == 2 + 2 + 5 + 2 and all(2 * written == 3 * read for read, written in stacks)
    # Under autocast the block norms write bfloat16: half of what they read in float32.
    norms = [(read, written) for name, read, written in calls if name == "defmamba.layer_norm_fwd"]
    assert any(written < read for read, written in norms)
    # Nothing of the pretended GPU outlives the trace.
    assert (dispatch._kernels_ready, torch.cuda.is_available()) == (ready_before, cuda_before)
    assert tool.main(["--model", "defmamba_tiny", "--batch-size", "1", "--image-size", "32", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "defmamba_tiny, batch 1, 32², autocast bfloat16:" in out and "GB read + written" in out
