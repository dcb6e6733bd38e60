"""Count the kernel launches of an eager DefMamba step, and where they come from, on a CPU.

In eager mode every kernel launch costs the host time (about 50 µs each on the H200 machines of
docs/benchmarks.md), so a host-bound step is as fast as its launches are few. This tool counts
them without a GPU: it runs the model on CPU tensors along the GPU routes (the Triton kernels'
Python wrappers, their kernels replaced by counters, TRITON_INTERPRET set so that their CPU-tensor
checks pass), under float16 (or ``--dtype bfloat16``) autocast, and records every ATen operator
that would launch a kernel (views, allocations and metadata operators launch none) with the model
source line that issued it, and every operator that would make the host wait for the GPU
(``.item()``, a data-dependent output size); an operator of autograd's own backward formulas is
attributed to its node and to the library line whose forward made the node
('aten::mm  @ MmBackward0 of models/dssm.py:80 forward').

    python tools/count_launches.py [--model defmamba_tiny] [--mode train|infer] [--size 224]
                                   [--dtype float16|bfloat16] [--top 30] [--json FILE]
    python tools/count_launches.py --model swin_tiny_patch4_window7_224     # a timm peer, the same count

The counts are of operators, not of CUDA kernels: an operator may launch more than one kernel
(a sort, a GEMM with a split-K reduction), the optimizer's launches are not included, and autocast's
CPU and CUDA operator lists differ in a few operators. The profile on a GPU
(``tools/profile_model.py``) gives the exact kernels; this gives their sources, anywhere.
"""
from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Optional, Sequence

os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined, so before the library is imported

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import defmamba  # noqa: E402
from defmamba.cuda_graphs import HOST_SYNC_OPS  # noqa: E402

__all__ = ["LaunchCounter", "gpu_routes_on_cpu", "count_step", "main"]

# Operators that launch no kernel: views, allocations without initialisation, metadata.
NO_LAUNCH = {
    "view", "_unsafe_view", "permute", "expand", "transpose", "t", "as_strided", "slice", "select", "unsqueeze",
    "squeeze", "alias", "detach", "unbind", "split", "split_with_sizes", "chunk", "reshape", "unflatten",
    "flatten", "narrow", "view_as", "expand_as", "diagonal", "_reshape_alias", "lift_fresh", "empty_like", "empty",
    "new_empty", "empty_strided", "new_empty_strided", "is_same_size", "sym_size", "sym_stride", "sym_numel",
    "set_", "_local_scalar_dense", "resolve_conj", "resolve_neg", "result_type", "promote_types", "device",
    "_has_compatible_shallow_copy_type", "is_nonzero", "contiguous",
}
TRITON_KERNEL = "triton"


_ROOT = os.sep + "defmamba" + os.sep
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<name>\S+)')


def _source(frames: list[traceback.FrameSummary]) -> str:
    """The innermost frame in the library: 'models/dssm.py:64 forward'."""
    for frame in reversed(frames):
        if _ROOT in frame.filename and "count_launches" not in frame.filename:
            return f"{frame.filename.split(_ROOT, 1)[1]}:{frame.lineno} {frame.name}"
    return "outside the library"


def _node_source(node: object) -> str:
    """For an operator that autograd's backward node ``node`` issued outside the library: the node
    and the library line whose forward made it ('MmBackward0 of models/dssm.py:80 forward'), read
    from the forward's stack that anomaly mode keeps on the node."""
    stack = getattr(node, "metadata", {}).get("traceback_", [])
    text = "".join(stack) if isinstance(stack, list) else str(stack)
    for match in reversed(list(_FRAME.finditer(text))):
        if _ROOT in match["file"] and "kernel_op.py" not in match["file"]:
            return f"{type(node).__name__} of {match['file'].split(_ROOT, 1)[1]}:{match['line']} {match['name']}"
    return f"{type(node).__name__} of a forward outside the library"


class LaunchCounter(TorchDispatchMode):
    """Counts launching operators (and the Triton kernels reported to :meth:`triton_launch`) by
    name and by source line, separately for the phases set in :attr:`phase`."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "forward"
        self.by_op: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.by_source: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.host_syncs: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.active = True

    def record(self, name: str) -> None:
        if self.active:
            self.by_op[self.phase][name] += 1
            source = _source(traceback.extract_stack()[:-2])
            if source == "outside the library" and self.phase == "backward":
                node = torch._C._current_autograd_node()  # the backward node issuing it (autograd's own formulas)
                if node is not None:
                    source = _node_source(node)
            self.by_source[self.phase][f"{name}  @ {source}"] += 1

    def triton_launch(self, kernel_name: str) -> None:
        self.record(f"{TRITON_KERNEL}::{kernel_name}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if self.active and name in HOST_SYNC_OPS:
            self.host_syncs[self.phase][f"aten::{name}  @ {_source(traceback.extract_stack()[:-1])}"] += 1
        if name not in NO_LAUNCH and not name.endswith("_copy_nocopy"):
            self.record(f"aten::{name}" if func.namespace == "aten" else f"{func.namespace}::{name}")
        return func(*args, **(kwargs or {}))

    def totals(self) -> dict[str, int]:
        return {phase: sum(counts.values()) for phase, counts in self.by_op.items()}


class gpu_routes_on_cpu:
    """Inside this block, the library takes its GPU routes for CPU tensors, with each Triton kernel
    launch reported to ``counter`` instead of run."""

    def __init__(self, counter: LaunchCounter) -> None:
        self.counter = counter
        self.saved: list[tuple[object, str, object]] = []

    def _patch(self, owner: object, name: str, value: object) -> None:
        self.saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def __enter__(self) -> "gpu_routes_on_cpu":
        from triton.runtime.interpreter import InterpretedFunction

        from defmamba.ops import dispatch
        from defmamba.ops.layer_norm.triton import _ln_fwd_kernel

        if not isinstance(_ln_fwd_kernel, InterpretedFunction):
            raise RuntimeError("count_launches: the library's Triton kernels were defined before TRITON_INTERPRET=1 "
                               "was set; run tools/count_launches.py as a script (or import it before defmamba)")
        counter = self.counter

        def use_kernels(op: str, *tensors: Optional[torch.Tensor]) -> bool:
            # dispatch.use_kernels's rule with CPU tensors standing for CUDA ones
            return (not dispatch.reference_forced(op) and not torch.jit.is_tracing()
                    and all(t is None or (t.dtype in dispatch.KERNEL_DTYPES and t.numel()) for t in tensors))

        def launch(kernel, grid):
            return lambda *args, **kwargs: counter.triton_launch(kernel.fn.__name__)

        rule = dispatch.use_kernels
        for name, module in list(sys.modules.items()):
            if name.startswith("defmamba.ops.") and module is not dispatch and getattr(module, "use_kernels", None) is rule:
                self._patch(module, "use_kernels", use_kernels)
        self._patch(InterpretedFunction, "__getitem__", launch)
        # the ops ask whether CUDA autocast is on: it is, where the CPU one is
        enabled, autocast_dtype = torch.is_autocast_enabled, torch.get_autocast_dtype
        self._patch(torch, "is_autocast_enabled",
                    lambda device_type=None: enabled("cpu" if device_type == "cuda" else device_type)
                    if device_type is not None else enabled())
        self._patch(torch, "get_autocast_dtype",
                    lambda device_type: autocast_dtype("cpu" if device_type == "cuda" else device_type))
        scan = importlib.import_module("defmamba.ops.selective_scan")
        triton_scan = importlib.import_module("defmamba.ops.selective_scan.triton")
        self._patch(scan, "_loaded", dict(scan._loaded, triton=(triton_scan.selective_scan_triton, ""),
                                          cuda=(None, "not counted")))
        self._patch(scan, "BACKENDS", ("triton", "torch"))
        self._patch(scan, "resolve_backend", _cpu_as_cuda(scan.resolve_backend))
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, value in reversed(self.saved):
            setattr(owner, name, value)


def _cpu_as_cuda(resolve):
    def resolve_backend(backend: str, device: torch.device):
        return resolve(backend, torch.device("cuda") if device.type == "cpu" else device)
    return resolve_backend


def count_step(model_name: str = "defmamba_tiny", mode: str = "train", size: int = 224, batch: int = 2,
               dtype: torch.dtype = torch.float16) -> LaunchCounter:
    """The launches of the second of two steps (the first fills the library's caches): forward and,
    in training, backward of a cross-entropy loss under autocast to ``dtype`` (float16 or bfloat16).
    ``model_name``: a DefMamba variant or any timm model (a peer)."""
    import timm

    torch.manual_seed(0)
    if model_name not in timm.list_models():
        raise ValueError(f"count_launches: unknown model {model_name!r}; name a DefMamba variant "
                         f"(defmamba_tiny/small/base) or a timm model such as swin_tiny_patch4_window7_224")
    # channels-last, as tools/benchmark.py and training run it (the depthwise-conv kernels need it)
    model = timm.create_model(model_name).to(memory_format=torch.channels_last).train(mode == "train")
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (batch,))
    counter = LaunchCounter()
    # anomaly mode keeps each backward node's forward stack: the backward's operators are
    # attributed to the library line whose forward made their node
    with gpu_routes_on_cpu(counter), counter, torch.set_grad_enabled(mode == "train"), \
            torch.autograd.set_detect_anomaly(True, check_nan=False):
        for step in range(2):
            counter.active = step == 1
            counter.phase = "forward"
            with torch.autocast("cpu", dtype=dtype):
                loss = torch.nn.functional.cross_entropy(model(x).float(), target)
            if mode == "train":
                counter.phase = "backward"
                loss.backward()
                model.zero_grad(set_to_none=True)
    return counter


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="defmamba_tiny",
                        help="a DefMamba variant or a timm peer (default defmamba_tiny)")
    parser.add_argument("--mode", default="train", choices=["train", "infer"])
    parser.add_argument("--size", type=int, default=224, help="image size (default 224; the peers may need theirs)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"], help="the autocast dtype")
    parser.add_argument("--top", type=int, default=30, help="rows per table (default 30)")
    parser.add_argument("--json", type=Path, help="write every count here")
    args = parser.parse_args(argv)
    counter = count_step(args.model, args.mode, args.size, dtype=getattr(torch, args.dtype))
    report = dict(model=args.model, mode=args.mode, dtype=args.dtype, totals=counter.totals(),
                  by_op={p: dict(c.most_common()) for p, c in counter.by_op.items()},
                  by_source={p: dict(c.most_common()) for p, c in counter.by_source.items()},
                  host_syncs={p: dict(c.most_common()) for p, c in counter.host_syncs.items() if c})
    for phase, total in report["totals"].items():
        syncs = counter.host_syncs[phase]
        print(f"== {args.model} {args.mode} {args.dtype}, {phase}: {total} launching operators, "
              f"{sum(syncs.values())} host synchronisations")
        for name, count in syncs.most_common():
            print(f"  {count:5d}  {name}  (host sync)")
        for name, count in counter.by_op[phase].most_common(args.top):
            print(f"  {count:5d}  {name}")
        print("  by source:")
        for name, count in counter.by_source[phase].most_common(args.top):
            print(f"  {count:5d}  {name}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
