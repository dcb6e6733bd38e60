"""tools/count_launches.py: the launches of an eager step along the GPU routes, counted on CPU."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]


def _count(out: Path, dtype: str) -> tuple[dict, str]:
    """The tool's report and its printout for a DefMamba-T training step at 64² (the count does not
    depend on the size: every stage keeps its blocks)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(REPO / "tools" / "count_launches.py"), "--json", str(out),
                             "--top", "5", "--size", "64", "--dtype", dtype],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout


def test_training_step_of_tiny_along_the_gpu_routes(tmp_path):
    half, printout = _count(tmp_path / "half.json", "float16")
    _check_tiny(half)
    assert "launching operators" in printout
    # bfloat16 autocast takes the same routes: not one launch more or less, op by op
    brain, _ = _count(tmp_path / "brain.json", "bfloat16")
    assert (half["dtype"], brain["dtype"]) == ("float16", "bfloat16")
    assert half["by_op"] == brain["by_op"]
    # nothing in the step makes the host wait for the GPU (it would stall the host-bound pipeline)
    assert half["host_syncs"] == brain["host_syncs"] == {}
    assert "0 host synchronisations" in printout


def _check_tiny(report: dict) -> None:
    forward, backward = report["by_op"]["forward"], report["by_op"]["backward"]
    blocks = 2 + 2 + 5 + 2  # DefMamba-T
    # one launch of each of the block's kernels per block, each way: the GPU routes were taken
    for kernel in ("_scan_fwd_kernel", "_sampling_fwd_kernel", "_positions_fwd_kernel", "_merge_gate_fwd_kernel",
                   "_stack_orders_fwd_kernel", "_projection_kernel"):
        assert forward[f"triton::{kernel}"] == blocks, kernel
    for kernel in ("_scan_bwd_kernel", "_sampling_bwd_kernel", "_positions_bwd_kernel", "_gelu_grad_kernel"):
        assert backward[f"triton::{kernel}"] == blocks, kernel
    assert forward["triton::_dwconv_fwd_kernel"] == 2 * blocks  # the block's conv and the offset network's
    # the blocks' matmul parameters cast once per stage each way, the stem's, downsamples' and head's
    # once for the model (models/autocast_parameters.py)
    assert forward["aten::_foreach_copy_"] == backward["aten::_foreach_copy_"] == 4 + 1
    sources = report["by_source"]
    # the time-step projection reads dt in place: the DSSM's only copy is torch.matmul's of the
    # broadcast x_proj weight
    assert sum(n for s, n in sources["forward"].items() if s.startswith("aten::clone") and "models/dssm.py" in s) \
        == blocks
    # the depthwise convolution's weight taps copied once per call, in the forward only
    assert sum(n for s, n in sources["forward"].items() if "_taps" in s) == 2 * blocks
    assert not [s for s in sources["backward"] if "_taps" in s]
    # a residual sum and the norm after it as one kernel each way (ops/layer_norm residual_layer_norm):
    # in every block x + DropPath(DSSM) and norm2, and in every block but a stage's last its output and
    # the next block's first norm (models/blocks.py DMBlockSequence)
    for phase, kernel, caller in (("forward", "_ln_fwd_kernel", "_residual_forward"),
                                  ("backward", "_ln_bwd_kernel", "_residual_gradients")):
        fused = sum(n for s, n in sources[phase].items() if s.startswith(f"triton::{kernel}") and caller in s)
        assert fused == blocks + (blocks - 4)
    # autograd's own backward operators are traced to the forward line that made their node: only
    # the loss's (ones_like, log-softmax and NLL backward, the logits' cast) come from outside
    unattributed = {s: n for s, n in sources["backward"].items() if "outside the library" in s}
    assert sum(unattributed.values()) <= 4, unattributed
    assert any(s.startswith("aten::mm  @ MmBackward0 of models/dssm.py:") for s in sources["backward"])
    for phase in ("forward", "backward"):
        totals = report["totals"][phase]
        assert sum(report["by_source"][phase].values()) == totals == sum(report["by_op"][phase].values())


def test_host_synchronisations_are_counted_with_their_source():
    """``bool(t)`` and a data-dependent size (``nonzero``) are the host waits the step must not have."""
    code = ("import sys; sys.path.insert(0, 'tools'); import count_launches, torch\n"
            "counter = count_launches.LaunchCounter()\n"
            "with counter:\n"
            "    x = torch.arange(4.0)\n"
            "    if x.sum() > 1:\n"
            "        x.nonzero()\n"
            "print(sorted(counter.host_syncs['forward'].elements()))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    syncs = ast.literal_eval(result.stdout.strip().splitlines()[-1])
    assert [s.split("  @ ")[0] for s in syncs] == ["aten::_local_scalar_dense", "aten::nonzero"], syncs
