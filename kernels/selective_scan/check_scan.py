"""Device check of the CUDA selective scan: exactness against the float64 reference (forward and
all gradients, every input dtype, odd lengths, grouped B/C, non-contiguous inputs, poisoned
outputs), torch.compile(fullgraph=True), and CUDA-event timings at the DefMamba stage shapes.

    python kernels/selective_scan/check_scan.py [--quick] [--bench-only] [--json out.json]

Run from the repository root after building the extension.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

import torch

from defmamba.ops.selective_scan.cuda import is_available, selective_scan_cuda
from defmamba.ops.selective_scan.reference import selective_scan_torch

DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def poison_cache() -> None:
    """Fill freed cached blocks with NaN so outputs the kernels fail to write show up."""
    big = torch.empty(1 << 28, device="cuda")  # 1 GiB
    big.fill_(float("nan"))
    del big


def make_inputs(batch, channels, groups, length, n_state, dtype, softplus, noncontig, gen):
    dev = "cuda"

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device=dev) * scale

    if noncontig:
        u = rnd(batch, length, channels).transpose(1, 2)
        delta = rnd(batch, length, channels, scale=0.5).transpose(1, 2)
    else:
        u = rnd(batch, channels, length)
        delta = rnd(batch, channels, length, scale=0.5)
    if not softplus:
        delta = delta.abs() * 0.3
    A = -torch.exp(rnd(channels, n_state, scale=0.5))
    B = rnd(batch, groups, n_state, length)
    C = rnd(batch, groups, n_state, length)
    D = rnd(channels)
    bias = rnd(channels, scale=0.5)
    u, delta, B, C = (t.to(dtype) for t in (u, delta, B, C))
    return u, delta, A, B, C, D, bias


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_case(batch, channels, groups, length, n_state, dtype_name, out_f32, softplus, use_d, noncontig, gen):
    dtype = DT[dtype_name]
    u, delta, A, B, C, D, bias = make_inputs(batch, channels, groups, length, n_state, dtype, softplus, noncontig, gen)
    if not use_d:
        D = bias = None
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (u, delta, A, B, C, D, bias)]
    out_dtype = torch.float32 if out_f32 else None
    poison_cache()
    y = selective_scan_cuda(*leaves, delta_softplus=softplus, out_dtype=out_dtype)
    w = torch.randn(y.shape, generator=gen, device="cuda")
    poison_cache()
    (y.float() * w).sum().backward()
    ref_leaves = [t.detach().double().requires_grad_(True) if t is not None else None for t in (u, delta, A, B, C, D, bias)]
    y_ref = selective_scan_torch(*ref_leaves, delta_softplus=softplus, out_dtype=torch.float64)
    (y_ref * w.double()).sum().backward()
    # fp32: state-precision error; 16-bit: rounding of the stored outputs/grads dominates.
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    tol_y = 2e-5 if (dtype == torch.float32 or out_f32) else 1e-2
    errs = {"y": rel(y, y_ref)}
    ok = torch.isfinite(y).all().item() and errs["y"] <= tol_y and y.dtype == (torch.float32 if out_f32 else dtype)
    for name, a, r in zip(("du", "ddelta", "dA", "dB", "dC", "dD", "dbias"), leaves, ref_leaves):
        if a is None:
            continue
        g = a.grad
        r_grad = r.grad if r.grad is not None else torch.zeros_like(r)  # e.g. dA at L=1: A unused
        finite = torch.isfinite(g).all().item()
        e = rel(g, r_grad) if r_grad.norm() > 0 else g.abs().max().item()
        errs[name] = e
        # dA/dD/dbias are float32 sums; dB/dC are float32 sums rounded to the input dtype.
        t = 2e-5 if name in ("dA", "dD", "dbias") and dtype == torch.float32 else tol
        if name in ("dA", "dD", "dbias"):
            t = max(t, 1e-4)
        ok = ok and finite and e <= t and g.dtype == a.dtype
    desc = (f"b={batch} ch={channels} K={groups} L={length} N={n_state} {dtype_name} out={'f32' if out_f32 else 'in'} "
            f"sp={int(softplus)} D={int(use_d)} nc={int(noncontig)}")
    worst = max(errs.values())
    print(f"{'PASS' if ok else 'FAIL'} {desc}  max_rel={worst:.2e}  " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()))
    return ok


def check_large_values(gen) -> bool:
    """Huge delta and |A|: no NaN/inf, matches the reference."""
    u, delta, A, B, C, D, bias = make_inputs(2, 96, 3, 333, 16, torch.float32, True, False, gen)
    delta = delta * 200.0
    A = A * 100.0
    y = selective_scan_cuda(u, delta, A, B, C, D, bias, True)
    y_ref = selective_scan_torch(*(t.double() for t in (u, delta, A, B, C, D, bias)), delta_softplus=True)
    e = rel(y, y_ref)
    ok = torch.isfinite(y).all().item() and e < 1e-4
    print(f"{'PASS' if ok else 'FAIL'} large delta/|A|: rel={e:.2e}")
    return ok


def check_compile(gen) -> bool:
    u, delta, A, B, C, D, bias = make_inputs(2, 48, 3, 50, 16, torch.bfloat16, True, False, gen)
    leaves = [t.detach().clone().requires_grad_(True) for t in (u, delta, A, B, C, D, bias)]

    def f(*args):
        return selective_scan_cuda(*args, delta_softplus=True, out_dtype=torch.float32).sum()

    compiled = torch.compile(f, fullgraph=True)
    compiled(*leaves).backward()
    got = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    f(*leaves).backward()
    ok = all(torch.equal(a, t.grad) for a, t in zip(got, leaves))
    print(f"{'PASS' if ok else 'FAIL'} torch.compile(fullgraph=True) forward+backward")
    return ok


def time_ms(fn, warmup=3, reps=15) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def bench(shapes, results) -> None:
    gen = torch.Generator(device="cuda").manual_seed(1)
    name = torch.cuda.get_device_name()
    print(f"\ntimings on {name} (median of CUDA-event times, ms); floor = bytes/3.0 TB/s vs exps/4.1e12/s")
    print(f"{'shape':>28} {'dtype':>5} {'fwd':>7} {'fwd+bwd':>8} {'bytes floor':>11} {'exp floor':>9}")
    for batch, channels, length in shapes:
        for dn in ("fp32", "bf16"):
            dtype = DT[dn]
            u, delta, A, B, C, D, bias = make_inputs(batch, channels, 3, length, 16, dtype, True, False, gen)
            esize = u.element_size()
            bytes_fwd = esize * (3 * u.numel() + 2 * B.numel())
            exp_floor = batch * channels * length * 16 / 4.1e12 * 1e3
            with torch.no_grad():
                t_fwd = time_ms(lambda: selective_scan_cuda(u, delta, A, B, C, D, bias, True))
            leaves = [t.detach().requires_grad_(True) for t in (u, delta, A, B, C, D, bias)]
            dy = torch.randn_like(u)

            def fb():
                y = selective_scan_cuda(*leaves, delta_softplus=True)
                torch.autograd.grad(y, leaves, dy)

            t_fb = time_ms(fb)
            floor = bytes_fwd / 3.0e12 * 1e3
            print(f"{f'b={batch} ch={channels} L={length}':>28} {dn:>5} {t_fwd:7.3f} {t_fb:8.3f} {floor:11.3f} {exp_floor:9.3f}")
            results.append(dict(device=name, batch=batch, channels=channels, length=length, dtype=dn,
                                fwd_ms=t_fwd, fwd_bwd_ms=t_fb, bytes_floor_ms=floor, exp_floor_ms=exp_floor))
            del u, delta, B, C, leaves, dy


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--bench-only", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true", help="one fwd+bwd at the headline shape (for ncu)")
    args = ap.parse_args()
    ok, why = is_available()
    if not ok:
        print("CUDA backend unavailable:", why)
        return 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    if args.profile:
        leaves = [t.requires_grad_(True) for t in make_inputs(128, 288, 3, 3136, 16, torch.float32, True, False, gen)]
        y = selective_scan_cuda(*leaves, delta_softplus=True)
        torch.autograd.grad(y, leaves, torch.randn_like(y))
        torch.cuda.synchronize()
        return 0
    all_ok = True
    if not args.bench_only:
        cases = [
            # batch, channels, groups, L, N, dtype, out_f32, softplus, D, noncontig
            (2, 48, 3, 1, 16, "fp32", False, True, True, False),
            (3, 96, 3, 7, 16, "fp32", False, False, True, False),
            (1, 144, 3, 49, 16, "fp32", False, True, True, True),
            (2, 288, 3, 197, 16, "fp32", False, True, False, False),
            (1, 600, 3, 64, 16, "fp32", False, True, True, False),   # 200 channels a group: 2 blocks, atomics
            (2, 96, 3, 130, 8, "fp32", False, True, True, False),    # N < 16 (padded)
            (1, 64, 1, 4097, 16, "fp32", False, True, True, False),
            (2, 96, 3, 784, 16, "fp32", False, True, True, False),
            (2, 2304, 3, 49, 16, "fp32", False, True, True, False),
            (3, 96, 3, 37, 16, "fp16", False, True, True, False),
            (3, 96, 3, 37, 16, "fp16", True, True, True, True),
            (2, 144, 3, 200, 16, "bf16", False, True, True, False),
            (2, 144, 3, 200, 16, "bf16", True, True, True, False),
            (1, 48, 3, 3136, 16, "bf16", True, True, True, False),
            (2, 96, 3, 1, 16, "bf16", False, False, False, False),
        ]
        if not args.quick:
            cases += [(128, 48, 3, 49, 16, "fp32", False, True, True, False),
                      (4, 288, 3, 3136, 16, "fp32", False, True, True, False)]
        for case in cases:
            all_ok &= check_case(*case, gen=gen)
        all_ok &= check_large_values(gen)
        try:
            all_ok &= check_compile(gen)
        except Exception as err:  # report and go on to the timings
            print(f"FAIL torch.compile: {type(err).__name__}: {err}")
            all_ok = False
        torch.cuda.synchronize()
        print("ALL PASS" if all_ok else "SOME FAILED")
    results = []
    shapes = [(128, 288, 3136), (128, 576, 784), (128, 1152, 196), (128, 2304, 49)]
    bench(shapes, results)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
