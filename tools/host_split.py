"""Where an eager training step's host time goes: forward, backward and optimizer, next to the peers.

At a small batch the GPU finishes each kernel before the host has issued the next one, so the
host's wall time for each phase of a training step is what that phase costs the host. For every
model (DefMamba variants and timm peers, the same loop: autocast, GradScaler, fused AdamW) this
tool times, from an idle GPU and without waiting for it, the host's issue time of

* ``forward``: the model and the loss under autocast,
* ``backward``: ``scaler.scale(loss).backward()`` (autograd's engine thread runs every node),
* ``optimizer``: ``scaler.step``, ``scaler.update``, ``zero_grad``,

counts each phase's kernel launches under ``torch.profiler``, and divides: host µs per launch
per phase. With ``--top N`` it also lists the N operators and autograd nodes with the most host
(self CPU) time in one profiled step of the first model; with ``--python-profile N`` the N Python
functions with the most own time over five of its steps (cProfile: where the Python goes, the
Triton launcher, our op wrappers and autograd Functions, which the operator view does not show).

    python tools/host_split.py --models defmamba_tiny defmamba_small \
        --peers swin_tiny_patch4_window7_224 convnext_tiny --batch-size 8 --json host_split.json
    python tools/host_split.py --models defmamba_tiny --peers --python-profile 40
"""
from __future__ import annotations

import argparse
import cProfile
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

import defmamba  # noqa: E402
from defmamba.benchmark import _LAUNCH_CALLS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import unknown_model_names  # noqa: E402  (tools/benchmark.py: the same name rules)

__all__ = ["PHASES", "TrainingStep", "measure", "main"]

PHASES = ("forward", "backward", "optimizer")


class TrainingStep:
    """One eager training step of ``model`` split into its phases (each a method)."""

    def __init__(self, model: nn.Module, batch_size: int, image_size: int, amp_dtype: Optional[torch.dtype],
                 device: torch.device):
        self.model = model.to(device).train()
        self.device = device
        self.amp_dtype = amp_dtype
        self.images = torch.randn(batch_size, 3, image_size, image_size, device=device)
        with torch.no_grad():
            classes = model(self.images[:1]).shape[-1]
        self.targets = torch.randint(0, classes, (batch_size,), device=device)
        on_gpu = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=on_gpu or None)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        self.loss: Optional[torch.Tensor] = None

    def forward(self) -> None:
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            self.loss = nn.functional.cross_entropy(self.model(self.images), self.targets)

    def backward(self) -> None:
        self.scaler.scale(self.loss).backward()
        self.loss = None

    def optimizer_step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def phases(self) -> dict[str, Callable[[], None]]:
        return {"forward": self.forward, "backward": self.backward, "optimizer": self.optimizer_step}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step: TrainingStep, warmup: int = 3, repeats: int = 10) -> dict[str, dict[str, float]]:
    """Per phase: median host ms to issue it (the GPU idle at its start), kernel launches, µs per launch."""
    for _ in range(warmup):
        for run in step.phases().values():
            run()
    host_ms: dict[str, list[float]] = {phase: [] for phase in PHASES}
    for _ in range(repeats):
        for phase, run in step.phases().items():
            _sync(step.device)
            start = time.perf_counter()
            run()
            host_ms[phase].append(1000.0 * (time.perf_counter() - start))
    launches = _launches_per_phase(step) if step.device.type == "cuda" else {phase: None for phase in PHASES}
    report = {}
    for phase in PHASES:
        ms = statistics.median(host_ms[phase])
        count = launches[phase]
        report[phase] = {"host_ms": ms, "launches": count, "host_us_per_launch": 1000.0 * ms / count if count else None}
    return report


def _launches_per_phase(step: TrainingStep) -> dict[str, int]:
    from torch.profiler import ProfilerActivity, profile

    counts = {}
    for phase, run in step.phases().items():
        _sync(step.device)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        counts[phase] = sum(1 for e in prof.events() if e.name in _LAUNCH_CALLS)
    return counts


def top_host_events(step: TrainingStep, top: int) -> list[dict]:
    """The ``top`` operators / autograd nodes by self CPU time in one profiled training step."""
    from torch.profiler import ProfilerActivity, profile

    _sync(step.device)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for run in step.phases().values():
            run()
        _sync(step.device)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return [{"name": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1000.0,
             "cpu_ms": e.cpu_time_total / 1000.0} for e in rows]


def python_profile(step: TrainingStep, top: int, steps: int = 5) -> list[dict]:
    """The ``top`` Python functions (and built-ins) by own time over ``steps`` training steps, per
    step. The backward runs on this thread here, as this project's training loops run it (autograd's
    engine thread would hide its Python nodes from cProfile); the cProfile overhead inflates
    Python-heavy functions, so the times rank the costs rather than measure them."""
    profiler = cProfile.Profile()
    with torch.autograd.set_multithreading_enabled(False):
        _sync(step.device)
        profiler.enable()
        for _ in range(steps):
            for run in step.phases().values():
                run()
        _sync(step.device)
        profiler.disable()
    rows = []
    for (path, line, function), (_, calls, own, cumulative, _) in pstats.Stats(profiler).stats.items():
        name = f"{'/'.join(Path(path).parts[-3:])}:{line}({function})" if line else function  # a built-in: no file
        rows.append({"function": name, "calls": calls / steps,
                     "own_ms": 1000.0 * own / steps, "cumulative_ms": 1000.0 * cumulative / steps})
    return sorted(rows, key=lambda row: -row["own_ms"])[:top]


def build(name: str) -> nn.Module:
    if name.startswith("defmamba_"):
        return defmamba.build_model(name)
    import timm

    return timm.create_model(name)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["defmamba_tiny", "defmamba_small"])
    parser.add_argument("--peers", nargs="*", default=["swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224",
                                                       "convnext_tiny"])
    parser.add_argument("--batch-size", type=int, default=8,
                        help="small, so that the GPU keeps up with the host and wall time is host time")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--amp", default="float16", choices=["float16", "bfloat16", "none"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--top", type=int, default=0, help="also list the N largest host-time events of the first model")
    parser.add_argument("--python-profile", type=int, default=0, metavar="N",
                        help="also list the N Python functions with the most own time in the first model's "
                             "steps (cProfile)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    for problem in unknown_model_names(args.models, args.peers):
        parser.error(problem)
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    amp_dtype = None if args.amp == "none" else getattr(torch, args.amp)
    results, top, functions = {}, None, None
    print(f"{'model':32s} " + "  ".join(f"{p:>24s}" for p in PHASES) + "   (host ms / launches / µs per launch)")
    for i, name in enumerate(args.models + args.peers):
        step = TrainingStep(build(name), args.batch_size, args.image_size, amp_dtype, device)
        results[name] = measure(step, args.warmup, args.repeats)
        cells = []
        for phase in PHASES:
            r = results[name][phase]
            per = f"{r['host_us_per_launch']:.0f}" if r["host_us_per_launch"] else "-"
            cells.append(f"{r['host_ms']:8.1f} / {r['launches'] if r['launches'] is not None else '-':>5} / {per:>4}")
        print(f"{name:32s} " + "  ".join(f"{c:>24s}" for c in cells), flush=True)
        if i == 0 and args.top:
            top = top_host_events(step, args.top)
            for row in top:
                print(f"    {row['self_cpu_ms']:8.2f} ms self  {row['calls']:5d}×  {row['name'][:100]}")
        if i == 0 and args.python_profile:
            functions = python_profile(step, args.python_profile)
            print(f"    Python functions of {name}, per step (cProfile): own ms, cumulative ms, calls")
            for row in functions:
                times = f"{row['own_ms']:8.2f} {row['cumulative_ms']:9.2f} {row['calls']:8.0f}"
                print(f"    {times}  {row['function'][:100]}")
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        environment = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                       "torch": torch.__version__, "batch_size": args.batch_size, "image_size": args.image_size,
                       "amp": args.amp}
        Path(args.json).write_text(json.dumps({"environment": environment, "results": results,
                                               "top_host_events": top, "python_functions": functions}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
