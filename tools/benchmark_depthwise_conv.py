"""The Triton depthwise convolution against cuDNN (``F.conv2d``) at every shape DefMamba runs.

The shapes (channels, map size, kernel) come from the models' ``DepthwiseConv2d`` layers at 224²;
each runs at the benchmark batch on channels-last input, forward alone (no gradient) and forward +
backward (input, weight and bias gradients), timed with CUDA events: median of ``--repeats`` after
warm-up, both in the same process. ``calls`` says how often one forward of each model runs the shape, so
``calls × (cuDNN − Triton)`` is the time one pass of that model saves. Needs a CUDA GPU and Triton.

    python tools/benchmark_depthwise_conv.py --models defmamba_small --json dwconv.json

``--whole-model MODE ...`` measures the models instead, with cuDNN and with the Triton kernels one
after the other in the same process (the protocol of ``tools/benchmark.py``: median of timed windows
after warm-up):

    python tools/benchmark_depthwise_conv.py --models defmamba_small --whole-model train_bf16 infer_fp16
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import defmamba
from benchmark_helpers import MODES, ab_table_row, cuda_time_ms, measure_model
from defmamba.ops import reference_only, triton_support
from defmamba.ops.depthwise_conv import DepthwiseConv2d, depthwise_conv2d

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}  # None: no autocast


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["defmamba_tiny", "defmamba_small", "defmamba_base"])
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "bf16", "fp32"], choices=list(DTYPES))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--whole-model", nargs="+", choices=sorted(MODES), metavar="MODE",
                        help=f"A/B the whole models in these modes ({', '.join(MODES)}) instead of the shapes")
    parser.add_argument("--iters", type=int, default=3, help="iterations per timed window (--whole-model)")
    parser.add_argument("--json", type=str, default=None, help="write all results to this file")
    return parser.parse_args(argv)


def model_shapes(name: str) -> Counter:
    """(channels, height, width, kernel) → calls per forward, from one 224² forward on the CPU."""
    model = defmamba.build_model(name).eval()
    shapes: Counter = Counter()
    hooks = [m.register_forward_hook(lambda m, inputs, _out: shapes.update([(*inputs[0].shape[1:], m.kernel_size[0])]))
             for m in model.modules() if isinstance(m, DepthwiseConv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    for hook in hooks:
        hook.remove()
    return shapes


def time_shape(conv: Callable, shape: tuple, amp: Optional[torch.dtype], args: argparse.Namespace) -> dict:
    channels, height, width, k = shape
    x = torch.randn(args.batch_size, channels, height, width, device="cuda").contiguous(memory_format=torch.channels_last)
    weight = torch.randn(channels, 1, k, k, device="cuda", requires_grad=True)
    bias = torch.randn(channels, device="cuda", requires_grad=True)
    if amp is not None:
        x = x.to(amp)
    x.requires_grad_()
    grad = torch.randn_like(x)

    def forward() -> None:
        with torch.no_grad(), torch.autocast("cuda", dtype=amp or torch.float16, enabled=amp is not None):
            conv(x, weight, bias)

    def forward_backward() -> None:
        with torch.autocast("cuda", dtype=amp or torch.float16, enabled=amp is not None):
            y = conv(x, weight, bias)
        torch.autograd.backward(y, grad.to(y.dtype), inputs=[x, weight, bias])

    return {"fwd_ms": cuda_time_ms(forward, args.warmup, args.repeats),
            "fwd_bwd_ms": cuda_time_ms(forward_backward, args.warmup, args.repeats)}


def cudnn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=weight.shape[0])


def compare_models(args: argparse.Namespace) -> list[dict]:
    """Each model and mode with cuDNN, then with the Triton kernels (--whole-model)."""
    results = []
    print("| model | mode | cuDNN img/s | Triton img/s | change | peak GiB (cuDNN / Triton) |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        for mode in args.whole_model:
            row = {"model": name, "mode": mode}
            with reference_only("depthwise_conv"):
                row["cudnn"] = measure_model(name, mode, args.batch_size, args.warmup, args.repeats, args.iters)
            row["triton"] = measure_model(name, mode, args.batch_size, args.warmup, args.repeats, args.iters)
            print(ab_table_row(name, mode, row["cudnn"], row["triton"]), flush=True)
            results.append(row)
    return results


def compare_shapes(args: argparse.Namespace) -> list[dict]:
    """Every depthwise conv shape of the models, cuDNN against the Triton kernels."""
    calls: dict[tuple, dict[str, int]] = {}
    for name in args.models:
        for shape, n in model_shapes(name).items():
            calls.setdefault(shape, {})[name] = n
    results = []
    print("| C × H × W, K | calls | dtype | fwd cuDNN ms | fwd Triton ms | fwd+bwd cuDNN ms | fwd+bwd Triton ms |")
    print("|---|---|---|---|---|---|---|")
    for shape in sorted(calls, key=lambda s: (-s[1], s[0], s[3])):
        for dtype in args.dtypes:
            base = time_shape(cudnn, shape, DTYPES[dtype], args)
            mine = time_shape(depthwise_conv2d, shape, DTYPES[dtype], args)
            results.append({"shape": shape, "calls": calls[shape], "dtype": dtype, "cudnn": base, "triton": mine})
            per_model = ", ".join(f"{name.split('_')[-1]} {n}" for name, n in calls[shape].items())
            print(f"| {shape[0]} × {shape[1]} × {shape[2]}, {shape[3]} | {per_model} | {dtype} | "
                  f"{base['fwd_ms']:.3f} | {mine['fwd_ms']:.3f} | {base['fwd_bwd_ms']:.3f} | {mine['fwd_bwd_ms']:.3f} |",
                  flush=True)
    return results


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    ok, why = triton_support.is_available()  # also false without a CUDA GPU
    if not ok:
        print(f"error: the Triton depthwise convolution cannot run here: {why}", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch_size}, "
          f"median of {args.repeats} after {args.warmup} warm-up", flush=True)
    results = compare_models(args) if args.whole_model else compare_shapes(args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "batch_size": args.batch_size, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
