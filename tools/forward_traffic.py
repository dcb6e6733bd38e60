"""Bytes each operator of a DefMamba forward moves on the GPU path, computed on any machine.

The model runs on fake CUDA tensors (``FakeTensorMode``): nothing is computed and no GPU is needed,
but dispatch takes the GPU route, so the operator list is the one a GPU runs. That route includes
the Triton ops (through their custom ops' fake implementations) and CUDA autocast. For each
dispatched operator the bytes of its tensor inputs and outputs are summed, views and metadata
excluded: a lower bound on its memory traffic, and so on its time at a given bandwidth.
The backward cannot be traced this way, because the autograd engine needs a CUDA driver.

    python tools/forward_traffic.py --model defmamba_small --batch-size 128 --amp bfloat16
    python tools/forward_traffic.py --model defmamba_tiny --amp float16 --top 40 --json traffic.json

To make the GPU route run without a GPU, this tool:
* reports CUDA and bf16 support and a compute capability of 9.0;
* marks Triton as ready;
* routes the Triton ops through their custom ops, as ``torch.compile`` does.
Nothing of this outlives the trace.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from contextlib import ExitStack
from typing import Optional
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import defmamba  # noqa: E402
from defmamba.ops import dispatch  # noqa: E402

# Operators that move no data: views, metadata and allocation.
_NO_TRAFFIC = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "slice", "select", "split",
               "split_with_sizes", "unsqueeze", "squeeze", "as_strided", "detach", "alias", "unbind", "chunk",
               "reshape", "_reshape_alias", "lift_fresh", "empty", "empty_strided", "empty_like", "new_empty",
               "new_empty_strided"}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _TrafficCounter(TorchDispatchMode):
    """Records (operator, bytes read, bytes written) for every dispatched operator that moves data."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.namespace != "prim" and name not in _NO_TRAFFIC:
            read = sum(_nbytes(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
            written = sum(_nbytes(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
            self.calls.append((f"{func.namespace}.{name}", read, written))
        return out


def forward_traffic(model_name: str, batch_size: int = 128, image_size: int = 224,
                    amp: Optional[torch.dtype] = torch.bfloat16) -> list[tuple[str, int, int]]:
    """(operator, bytes read, bytes written) of every data-moving operator of one inference forward
    of ``model_name`` on the GPU path, in dispatch order."""
    model = defmamba.build_model(model_name).eval()
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        params = {k: v.to("cuda") for k, v in model.named_parameters()}
        images = torch.empty(batch_size, 3, image_size, image_size, device="cuda")
    counter = _TrafficCounter()
    ready = dispatch._kernels_ready
    try:
        with ExitStack() as stack:
            for target, value in (("torch.cuda.is_available", True), ("torch.cuda.is_bf16_supported", True),
                                  ("torch.cuda.get_device_capability", (9, 0)),
                                  ("torch.compiler.is_compiling", True)):
                stack.enter_context(mock.patch(target, lambda *a, value=value, **k: value))
            dispatch._kernels_ready = True
            with fake, counter, torch.no_grad(), torch.autocast("cuda", dtype=amp or torch.float32,
                                                                 enabled=amp is not None):
                torch.func.functional_call(model, params, (images,))
    finally:
        dispatch._kernels_ready = ready
    return counter.calls


def summarize(calls: list[tuple[str, int, int]]) -> dict[str, dict[str, float]]:
    """Per operator: calls and GB read + written, largest first."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for name, read, written in calls:
        totals[name][0] += 1
        totals[name][1] += (read + written) / 1e9
    return {name: {"calls": n, "gb": gb} for name, (n, gb) in sorted(totals.items(), key=lambda kv: -kv[1][1])}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="defmamba_small", choices=["defmamba_tiny", "defmamba_small", "defmamba_base"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--amp", default="bfloat16", choices=["float32", "float16", "bfloat16"],
                        help="autocast dtype (float32: no autocast)")
    parser.add_argument("--bandwidth-tbps", type=float, default=2.99,
                        help="bytes per second for the time column (default: the H100 copy bandwidth of the "
                             "first selective-scan run, docs/perf-history/benchmarks-rounds.md)")
    parser.add_argument("--top", type=int, default=25, help="operators listed")
    parser.add_argument("--json", default=None, help="write the per-operator totals to this file")
    args = parser.parse_args(argv)
    amp = None if args.amp == "float32" else getattr(torch, args.amp)
    calls = forward_traffic(args.model, args.batch_size, args.image_size, amp)
    by_op = summarize(calls)
    total_gb = sum(v["gb"] for v in by_op.values())
    print(f"{args.model}, batch {args.batch_size}, {args.image_size}², autocast {args.amp}: {len(calls)} operators, "
          f"{total_gb:.2f} GB read + written, {total_gb / args.bandwidth_tbps:.2f} ms at {args.bandwidth_tbps} TB/s")
    for name, v in list(by_op.items())[:args.top]:
        print(f"  {name:45s} {v['calls']:5d} calls {v['gb']:8.3f} GB {v['gb'] / args.bandwidth_tbps:7.3f} ms")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"settings": vars(args), "operators": len(calls), "total_gb": total_gb, "by_op": by_op}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
