"""Time the selective-scan backends at the stage shapes of DefMamba-T/S/B next to their floors.

For every shape, input dtype (float32, bfloat16), mode (forward, forward+backward) and available
backend: median of CUDA-event timings after warm-up, rotating over several input sets so repeated
runs do not just hit the L2 cache. Two floors are printed beside each time:

* bytes: every input read once and every output written once at the measured copy bandwidth
  (forward: u, delta, y of batch·KD·L elements and B, C of batch·K·N·L elements; forward+backward
  adds the backward's reads of u, delta, B, C, dy and writes of du, ddelta, dB, dC);
* exp: one exponential per (batch, channel, position, state) on the special-function units
  (16 per SM per clock): the forward needs batch·KD·L·N of them, the backward at least as many
  again (it must recompute exp(Δ·A) or read it, and reading it costs more bytes than the inputs).

Usage: python tools/benchmark_scan.py [--out results.json] [--backends triton,cuda] [--quick]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from defmamba.ops.selective_scan import available_backends, selective_scan

GROUPS, STATES, BATCH = 3, 16, 128
# (model, stage, K·D, L) at 224² input, batch 128.
STAGES = [
    ("T", 1, 144, 3136), ("T", 2, 288, 784), ("T", 3, 576, 196), ("T", 4, 1152, 49),
    ("S/B", 1, 288, 3136), ("S/B", 2, 576, 784), ("S/B", 3, 1152, 196), ("S/B", 4, 2304, 49),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written)."""
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return 2 * src.numel() * 4 / statistics.median(times)


def sm_clock_hz() -> float:
    """Maximum SM clock from nvidia-smi (falls back to the H100 SXM boost clock, 1.98 GHz)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout.split()
        return float(out[0]) * 1e6
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return 1.98e9


def floors(channels: int, length: int, dtype: torch.dtype, mode: str, bandwidth: float, exp_rate: float):
    """(bytes floor, exp floor) in milliseconds."""
    e = torch.finfo(dtype).bits // 8
    big = BATCH * channels * length  # u, delta, y, du, ddelta
    small = BATCH * GROUPS * STATES * length  # B, C, dB, dC
    nbytes = (3 * big + 2 * small) * e
    exps = BATCH * channels * length * STATES
    if mode == "fwd+bwd":
        nbytes += (5 * big + 4 * small) * e
        exps *= 2
    return nbytes / bandwidth * 1e3, exps / exp_rate * 1e3


def make_inputs(channels: int, length: int, dtype: torch.dtype, grad: bool, generator: torch.Generator):
    dev = "cuda"
    kw = dict(device=dev, generator=generator)
    u = torch.randn(BATCH, channels, length, **kw).to(dtype)
    delta = (torch.randn(BATCH, channels, length, **kw) - 1).to(dtype)
    A = -torch.rand(channels, STATES, **kw) - 0.1
    B = torch.randn(BATCH, GROUPS, STATES, length, **kw).to(dtype)
    C = torch.randn(BATCH, GROUPS, STATES, length, **kw).to(dtype)
    D = torch.randn(channels, **kw)
    bias = torch.randn(channels, **kw) * 0.3
    xs = [u, delta, A, B, C, D, bias]
    if grad:
        xs = [x.requires_grad_() for x in xs]
    return xs


def time_backend(backend: str, channels: int, length: int, dtype: torch.dtype, mode: str,
                 warmup: int, reps: int, n_sets: int) -> float:
    """Median milliseconds of one call (forward, or forward + backward)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    grad = mode == "fwd+bwd"
    sets = [make_inputs(channels, length, dtype, grad, gen) for _ in range(n_sets)]
    dy = torch.randn(BATCH, channels, length, device="cuda", generator=gen).to(dtype)

    def run(xs):
        if grad:
            y = selective_scan(*xs, delta_softplus=True, backend=backend)
            y.backward(dy)
        else:
            with torch.no_grad():
                selective_scan(*xs, delta_softplus=True, backend=backend)

    for i in range(warmup):
        run(sets[i % n_sets])
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        xs = sets[i % n_sets]
        if grad:
            for x in xs:
                x.grad = None
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(xs)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    del sets
    torch.cuda.empty_cache()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--backends", default="", help="comma list (default: every available GPU backend)")
    parser.add_argument("--torch-max-elements", type=float, default=2e6,
                        help="time the torch reference only where batch·KD·L is at most this (default 2e6)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="only the headline shape (S stage 1)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmark_scan.py needs a CUDA GPU")

    backends = [b for b in args.backends.split(",") if b] or available_backends("cuda")
    props = torch.cuda.get_device_properties(0)
    bandwidth = copy_bandwidth()
    clock = sm_clock_hz()
    exp_rate = props.multi_processor_count * 16 * clock
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {"gpu": props.name, "sms": props.multi_processor_count, "sm_clock_ghz": clock / 1e9,
           "copy_bandwidth_tbs": bandwidth / 1e12, "torch": torch.__version__, "cuda": torch.version.cuda,
           "triton": triton_version, "python": platform.python_version(), "backends": backends,
           "batch": BATCH, "groups": GROUPS, "states": STATES, "delta_softplus": True}
    print(f"GPU {props.name} ({props.multi_processor_count} SMs, max SM clock {clock / 1e9:.2f} GHz), "
          f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"triton {triton_version}; backends {backends}")

    stages = [s for s in STAGES if s[0] == "S/B" and s[1] == 1] if args.quick else STAGES
    rows = []
    for model, stage, channels, length in stages:
        for dname, dtype in DTYPES.items():
            for mode in ("fwd", "fwd+bwd"):
                f_bytes, f_exp = floors(channels, length, dtype, mode, bandwidth, exp_rate)
                for backend in backends:
                    if backend == "torch" and BATCH * channels * length > args.torch_max_elements:
                        continue
                    ms = time_backend(backend, channels, length, dtype, mode, args.warmup, args.reps, n_sets=3)
                    row = dict(model=model, stage=stage, channels=channels, length=length, dtype=dname, mode=mode,
                               backend=backend, ms=ms, floor_bytes_ms=f_bytes, floor_exp_ms=f_exp,
                               x_floor=ms / max(f_bytes, f_exp))
                    rows.append(row)
                    print(f"  {model:>3} s{stage} KD={channels:<5} L={length:<5} {dname:<4} {mode:<7} {backend:<6} "
                          f"{ms:8.3f} ms", flush=True)

    header = (f"| model | stage | K·D | L | dtype | mode | backend | time (ms) | bytes floor (ms) | "
              f"exp floor (ms) | × floor |")
    print("\n" + header + "\n|" + "---|" * 11)
    for r in rows:
        print(f"| {r['model']} | {r['stage']} | {r['channels']} | {r['length']} | {r['dtype']} | {r['mode']} | "
              f"{r['backend']} | {r['ms']:.3f} | {r['floor_bytes_ms']:.3f} | {r['floor_exp_ms']:.3f} | "
              f"{r['x_floor']:.1f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"env": env, "results": rows}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
