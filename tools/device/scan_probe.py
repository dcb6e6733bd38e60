"""Compare launch configurations of the Triton selective scan on the GPU (correctness, then time).

For each (direction, channels per program, opaque compilation) in the grid below: check forward
and gradients against the float64 reference on a small odd shape, then time the headline shape
(and the short-sequence stage) with tools/benchmark_scan.py's timer. Prints one table.
Usage: python tools/device/scan_probe.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
import benchmark_scan as bench  # noqa: E402
from defmamba.ops.selective_scan import triton as T  # noqa: E402
from defmamba.ops.selective_scan.reference import selective_scan_torch  # noqa: E402


def check(batch=2, channels=96, length=203) -> float:
    """Largest relative L2 error of y and all gradients against float64 on fresh inputs."""
    g = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 10**6, (1,))))
    xs = bench.make_inputs(channels, length, torch.float32, True, g)
    xs = [x.detach()[:batch].clone().requires_grad_() if x.dim() > 2 else x.detach().clone().requires_grad_()
          for x in xs]
    y = T.selective_scan_triton(*xs, delta_softplus=True)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, xs, dy)
    ref_in = [x.detach().double().requires_grad_() for x in xs]
    y_ref = selective_scan_torch(*ref_in, delta_softplus=True)
    ref_grads = torch.autograd.grad(y_ref, ref_in, dy.double())
    errs = [((a.double() - b).norm() / b.norm()).item() for a, b in zip((y, *grads), (y_ref, *ref_grads))]
    return max(errs)


def main() -> None:
    shapes = [(288, 3136), (2304, 49), (1152, 196)]
    rows = []
    default = dict(T._CONFIG)
    grid = [("fwd", 32, False), ("fwd", 32, True), ("fwd", 16, False),
            ("bwd", 8, True), ("bwd", 16, True), ("bwd", 32, True), ("bwd", 8, False), ("bwd", 32, False)]
    for direction, block, opaque in grid:
        T._CONFIG.clear()
        T._CONFIG.update(default)
        T._CONFIG[direction] = (block, opaque)
        mode = "fwd" if direction == "fwd" else "fwd+bwd"
        err = check()
        for channels, length in shapes:
            for dname in ("fp32", "bf16"):
                if dname == "bf16" and length != 3136:
                    continue
                ms = bench.time_backend("triton", channels, length, bench.DTYPES[dname], mode, 3, 15, 2)
                rows.append((direction, block, opaque, channels, length, dname, mode, ms, err))
                print(rows[-1], flush=True)
    print(f"\ndefault config {default}")
    print("| varied | block_c | opaque | K·D | L | dtype | mode | ms | max rel err |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]} | {r[6]} | {r[7]:.3f} | {r[8]:.1e} |")


if __name__ == "__main__":
    main()
