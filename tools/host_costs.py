"""What one call costs the host: launch primitives and each DefMamba op next to its PyTorch peer.

An eager training step of DefMamba is bound by the host (docs/benchmarks.md): what matters is the
host time per call, not the GPU time. This tool runs every case on tensors so small that the GPU
work is negligible, so the wall time per call is the host's cost of it: the launch primitives
(an ATen operator, a Triton kernel through Triton's launcher, through the library's
``fast_launch`` and through its compiled kernel, a Python autograd Function) and each op of the
library, forward and forward + backward, under the same autocast, next to the PyTorch module it
replaces. Wall time per call is the median over timed windows, each ended by a device
synchronisation.

    python tools/host_costs.py [--device cuda] [--dtype float16] [--json FILE] [--profile-block FILE]
                               [--autograd-device-thread]

Every backward runs on the main thread, as the training loops of this project run it;
``--autograd-device-thread`` runs it on autograd's device thread instead (PyTorch's default): run
once with and once without, it shows what the hand-over to that thread costs.

``--profile-block`` also writes cProfile's table (by own time) of DM-block forwards: where the
Python time of the forward goes (the backward runs in autograd's device thread, which cProfile
does not see). On a CPU the Triton cases are skipped and the rest runs the reference routes.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's library, not an installed one

from defmamba.models.blocks import DMBlock, Mlp  # noqa: E402
from defmamba.models.dssm import DSSM  # noqa: E402
from defmamba.ops import dispatch  # noqa: E402
from defmamba.ops.depthwise_conv import DepthwiseConv2d  # noqa: E402
from defmamba.ops.layer_norm import LayerNorm  # noqa: E402
from defmamba.ops.selective_scan import available_backends, selective_scan  # noqa: E402
from defmamba.ops.triton_launch import fast_launch  # noqa: E402
from defmamba.ops.triton_support import tl, triton  # noqa: E402

__all__ = ["time_call", "cases", "main"]

Case = tuple[str, str, Callable[[], object]]  # (group, name, one call)


def time_call(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int, iters: int) -> float:
    """Median wall µs per call of ``fn`` over ``repeats`` windows of ``iters`` calls (each window
    ends with a device synchronisation), after ``warmup`` untimed calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    windows = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        windows.append((time.perf_counter() - start) / iters * 1e6)
    return statistics.median(windows)


def _forward_backward(module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def step() -> None:
        out = module(x)
        out.backward(torch.ones_like(out))
    return step


def _module_cases(name: str, ours: nn.Module, peer: Optional[nn.Module], x: torch.Tensor) -> list[Case]:
    """Forward and forward + backward of ``ours`` and of its PyTorch ``peer`` on ``x``."""
    out = [("ops", f"{name} forward", lambda: ours(x)), ("ops", f"{name} forward+backward", _forward_backward(ours, x))]
    if peer is not None:
        out += [("ops", f"{name} forward (PyTorch peer)", lambda: peer(x)),
                ("ops", f"{name} forward+backward (PyTorch peer)", _forward_backward(peer, x))]
    return out


class _Double(torch.autograd.Function):
    """One ATen op each way inside a Python Function: the Function's own cost over ``x * 2``."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


def _primitive_cases(device: torch.device) -> list[Case]:
    small = torch.ones(64, device=device)
    leaf = torch.ones(64, device=device, requires_grad=True)
    out: list[Case] = [
        ("primitives", "ATen add", lambda: torch.add(small, 1.0)),
        ("primitives", "ATen empty", lambda: torch.empty(64, device=device)),
        ("primitives", "x * 2 forward+backward", lambda: (leaf * 2).backward(small)),
        ("primitives", "autograd.Function(x * 2) forward+backward", lambda: _Double.apply(leaf).backward(small)),
        ("primitives", "dispatch.use_kernels", lambda: dispatch.use_kernels("layer_norm", small)),
    ]
    if device.type == "cuda" and triton is not None and dispatch.use_kernels("layer_norm", small):
        out += _triton_cases(device)
    return out


def _triton_cases(device: torch.device) -> list[Case]:
    """A kernel of 8 pointers, 3 integers and 2 constexprs that does nothing: the launcher's cost."""
    @triton.jit
    def _noop(p0, p1, p2, p3, p4, p5, p6, p7, n0, n1, n2, A: tl.constexpr, B: tl.constexpr):
        pass

    tensors = [torch.empty(64, device=device) for _ in range(8)]

    def launch() -> None:
        _noop[(1,)](*tensors, 5, 64, 7, A=1, B=2)

    class _LaunchInBackward(_Double):
        """``_Double`` plus a Triton launch in the backward (autograd's device thread)."""

        @staticmethod
        def backward(ctx, grad):
            launch()
            return _Double.backward(ctx, grad)

    fast = fast_launch(_noop)

    def launch_fast() -> None:
        fast[(1,)](*tensors, 5, 64, 7, A=1, B=2)

    leaf, small = torch.ones(64, device=device, requires_grad=True), torch.ones(64, device=device)
    out: list[Case] = [
        ("primitives", "Triton launch (JIT launcher)", launch),
        ("primitives", "Triton launch (fast_launch)", launch_fast),
        ("primitives", "autograd.Function(x * 2) + Triton launch in backward, forward+backward",
         lambda: _LaunchInBackward.apply(leaf).backward(small)),
    ]
    with contextlib.suppress(Exception):  # the compiled kernel's call API differs between Triton versions
        compiled = _noop.warmup(*tensors, 5, 64, 7, A=1, B=2, grid=(1,))
        runner = compiled[(1, 1, 1)]
        runner(*tensors, 5, 64, 7, 1, 2)
        out.append(("primitives", "Triton launch (compiled kernel)", lambda: runner(*tensors, 5, 64, 7, 1, 2)))
    return out


def _layer_norm_kernel_cases(norm: nn.Module, x: torch.Tensor) -> list[Case]:
    """The Triton LayerNorm's forward and backward wrappers called directly, without autograd."""
    from defmamba.ops.layer_norm import triton as ln

    weight, bias = norm.weight.detach(), norm.bias.detach()
    y, mean, rstd = ln._forward(x, weight, bias, None, norm.eps, torch.float16, False)
    dy = torch.ones_like(y)
    return [("ops", "LayerNorm kernel wrapper forward (no autograd)",
             lambda: ln._forward(x, weight, bias, None, norm.eps, torch.float16, False)),
            ("ops", "LayerNorm kernel wrapper backward (no autograd)",
             lambda: ln._gradients(dy, x, weight, bias, None, mean, rstd, False))]


def cases(device: torch.device, dim: int = 96, size: int = 8) -> list[Case]:
    """Every case, on a (1, size, size, dim) map: primitives, then each op and its PyTorch peer."""
    torch.manual_seed(0)
    mk = dict(device=device)
    x_last = torch.randn(1, size, size, dim, **mk, requires_grad=True)
    x_map = torch.randn(1, dim, size, size, **mk).contiguous(memory_format=torch.channels_last).requires_grad_()
    out = _primitive_cases(device)
    norm = LayerNorm(dim, feeds_matmul=True).to(device)
    out += _module_cases("LayerNorm", norm, nn.LayerNorm(dim).to(device), x_last)
    if device.type == "cuda" and dispatch.use_kernels("layer_norm", x_last):
        out += _layer_norm_kernel_cases(norm, x_last.detach())
    peer_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim).to(device)
    out += _module_cases("DepthwiseConv2d 3×3", DepthwiseConv2d(dim, 3).to(device), peer_conv, x_map)
    peer_mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)).to(device)
    out += _module_cases("Mlp", Mlp(dim, 4 * dim).to(device), peer_mlp, x_last)
    length, state = size * size, 16
    scan_inputs = [torch.randn(1, 3 * dim, length, **mk), torch.rand(1, 3 * dim, length, **mk),
                   -torch.rand(3 * dim, state, **mk), torch.randn(1, 3, state, length, **mk),
                   torch.randn(1, 3, state, length, **mk), torch.ones(3 * dim, **mk), torch.zeros(3 * dim, **mk)]
    for t in scan_inputs[:2]:
        t.requires_grad_()
    for backend in available_backends(device):
        def scan(backend=backend):
            return selective_scan(*scan_inputs, delta_softplus=True, backend=backend)

        def scan_step(backend=backend):
            y = scan(backend)
            y.backward(torch.ones_like(y))
        out += [("ops", f"selective scan ({backend}) forward", scan),
                ("ops", f"selective scan ({backend}) forward+backward", scan_step)]
    out += _module_cases("DSSM", DSSM(dim, 7).to(device), None, x_last)
    out += _module_cases("DMBlock", DMBlock(dim, 7).to(device), None, x_last)
    return out


def profile_block(device: torch.device, dtype: Optional[torch.dtype], calls: int, dim: int = 96,
                  size: int = 8, top: int = 40) -> str:
    """cProfile's table (own time, the ``top`` first) of ``calls`` DM-block forwards with gradients."""
    block = DMBlock(dim, 7).to(device)
    x = torch.randn(1, size, size, dim, device=device, requires_grad=True)
    with _autocast(device, dtype):
        for _ in range(5):
            block(x)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            block(x)
        profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                        help="autocast dtype of the op cases (float32: no autocast)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--only", default="", help="run only the cases whose name contains this text")
    parser.add_argument("--autograd-device-thread", action="store_true",
                        help="run every backward on autograd's device thread (PyTorch's default), not on the "
                             "calling thread (torch.autograd.set_multithreading_enabled(False))")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--profile-block", default=None, help="write cProfile's table of DM-block forwards here")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = None if args.dtype == "float32" else getattr(torch, args.dtype)
    results = []
    with _autocast(device, dtype), torch.autograd.set_multithreading_enabled(args.autograd_device_thread):
        for group, name, fn in cases(device):
            if args.only not in name:
                continue
            us = time_call(fn, device, args.warmup, args.repeats, args.iters)
            results.append({"group": group, "case": name, "host_us": us})
            print(f"{group:10s} {name:55s} {us:9.1f} µs", flush=True)
    if args.json:
        environment = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                       "torch": torch.__version__, "triton": getattr(triton, "__version__", None),
                       "autocast": args.dtype, "autograd_device_thread": args.autograd_device_thread}
        Path(args.json).write_text(json.dumps({"environment": environment, "results": results}, indent=1))
    if args.profile_block:
        Path(args.profile_block).write_text(profile_block(device, dtype, calls=200))
    return 0


if __name__ == "__main__":
    sys.exit(main())
