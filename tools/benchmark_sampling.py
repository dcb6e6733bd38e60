"""DefMamba with the Triton deformable-sampling op against its PyTorch formulation, on one GPU.

For each model and mode the two are measured one after the other in the same process (the
protocol of ``tools/benchmark.py``: batch 128, median of timed windows after warm-up), so the
comparison holds on one card. Needs a CUDA GPU and Triton.

    python tools/benchmark_sampling.py --models defmamba_small defmamba_tiny --json sampling.json
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

import torch

from benchmark_helpers import MODES, ab_table_row, measure_model
from defmamba.ops import reference_only, triton_support

DEFAULT_MODES = ["infer_fp32", "infer_fp16", "train_fp16", "train_bf16"]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["defmamba_tiny", "defmamba_small", "defmamba_base"])
    parser.add_argument("--modes", nargs="+", default=DEFAULT_MODES, choices=sorted(MODES))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--json", type=str, default=None, help="write all results to this file")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("error: this comparison needs a CUDA GPU", file=sys.stderr)
        return 2
    ok, why = triton_support.is_available()
    if not ok:
        print(f"error: the Triton deformable-sampling kernels cannot run here: {why}", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch_size}, median of "
          f"{args.repeats} windows × {args.iters} iterations after {args.warmup} warm-up", flush=True)
    results: dict = {}
    print("| model | mode | PyTorch img/s | Triton op img/s | change | peak GiB (PyTorch / Triton) |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        for mode in args.modes:
            with reference_only("deformable_sampling"):
                base = measure_model(name, mode, args.batch_size, args.warmup, args.repeats, args.iters)
            fused = measure_model(name, mode, args.batch_size, args.warmup, args.repeats, args.iters)
            results[f"{name} {mode}"] = {"pytorch": base, "triton": fused}
            print(ab_table_row(name, mode, base, fused), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
