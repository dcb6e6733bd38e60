"""Where the time goes: profile one DefMamba inference pass and one training step on the GPU.

Prints the CUDA time and the kernel launches per operator category (scan kernels, grid_sample,
LayerNorm, GEMMs, copies/casts, ...), the top kernels by time and by launches, and writes the whole
table as JSON. In eager mode every launch costs the host time, so the launch counts say where a
host-bound step's time goes.

    python tools/profile_model.py --model defmamba_small --batch-size 128 --amp float16 --out prof.json
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import defmamba

# First matching pattern names the category of a CUDA kernel / op.
CATEGORIES = [
    ("scan-order merge + gate", r"_merge_gate_(fwd|bwd)_kernel"),
    ("scan-order stack", r"_stack_orders_(fwd|bwd)_kernel"),
    ("selective scan", r"selective|scan|_ss_|ssm"),
    ("deformable sampling", r"grid_sampler|grid_sample|bilinear_sampler|_sampling_(fwd|bwd)_kernel"),
    ("upsample (rpe resize)", r"upsample"),
    ("time-step projection", r"_projection_kernel"),
    ("layer_norm", r"layer_norm|LayerNorm|layernorm|_ln_(fwd|bwd)_kernel"),
    # cuDNN's convolution kernels: implicit GEMMs, data/weight gradients, layout transforms.
    ("conv", r"conv|implicit_gemm|dgrad|wgrad|tensorTransform|cudnn|depthwise"),
    ("GEMM", r"gemm|cutlass|cublas|sm90_xmma|sm80_xmma|matmul|bmm|nvjet"),
    ("sort / gather / scatter", r"sort|radix|gather|scatter|index|cub::"),
    ("copies / casts", r"copy|cast|contiguous|to_copy|direct_copy|fill"),
    ("elementwise", r"elementwise|vectorized|unrolled|reduce|softmax|gelu|silu|tanh|sigmoid"),
    ("optimizer", r"adam|multi_tensor|foreach"),
]


def categorise(name: str) -> str:
    for category, pattern in CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return category
    return "other"


def kernel_times(prof) -> tuple[dict[str, float], dict[str, int]]:
    """CUDA kernel time (ms) and launches per kernel name."""
    times: dict[str, float] = defaultdict(float)
    launches: dict[str, int] = defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.name] += event.device_time_total / 1000
            launches[event.name] += 1
    return times, launches


def ops_by_shape(prof, top: int) -> list[tuple[str, str, int, float]]:
    """(aten op, input shapes, calls, CUDA ms including the op's callees), the largest first."""
    rows = [(e.key, str(e.input_shapes), e.count, e.device_time_total / 1000)
            for e in prof.key_averages(group_by_input_shape=True)
            if e.key.startswith("aten::") and e.device_time_total > 0]
    return sorted(rows, key=lambda row: -row[3])[:top]


def run(args: argparse.Namespace) -> dict:
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    model = defmamba.build_model(args.model, scan_backend=args.backend).to(device).to(memory_format=torch.channels_last)
    images = torch.randn(args.batch_size, 3, args.size, args.size, device=device)
    targets = torch.randint(0, 1000, (args.batch_size,), device=device)
    amp_dtype = {"none": None, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.amp]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as benchmark.py --host-cost
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    def infer():
        model.eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            model(images)

    def train():
        model.train()
        with torch.autocast("cuda", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    report = {}
    for name, step in (("infer", infer), ("train", train)):
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if args.ops_by_shape else [])
        with profile(activities=activities, record_shapes=args.ops_by_shape) as prof:
            step()
            torch.cuda.synchronize()
        kernels, launches = kernel_times(prof)
        total = sum(kernels.values())
        by_category: dict[str, float] = defaultdict(float)
        launches_by_category: dict[str, int] = defaultdict(int)
        for kernel, ms in kernels.items():
            by_category[categorise(kernel)] += ms
            launches_by_category[categorise(kernel)] += launches[kernel]
        top = sorted(kernels.items(), key=lambda kv: -kv[1])[: args.top]
        most_launched = sorted(launches.items(), key=lambda kv: -kv[1])[: args.top]
        report[name] = {"total_ms": total, "launches": sum(launches.values()), "by_category_ms": dict(by_category),
                        "launches_by_category": dict(launches_by_category), "top_kernels_ms": top,
                        "top_kernels_by_launches": most_launched}
        print(f"\n== {args.model} {name} (batch {args.batch_size}, amp {args.amp}, backend {args.backend}): "
              f"{total:.1f} ms CUDA time, {sum(launches.values())} kernel launches")
        for category, ms in sorted(by_category.items(), key=lambda kv: -kv[1]):
            print(f"  {category:28s} {ms:8.2f} ms  {100 * ms / total:5.1f}%  {launches_by_category[category]:5d} launches")
        print("  top kernels:")
        for kernel, ms in top:
            print(f"    {ms:8.2f} ms  {kernel[:110]}")
        print("  most launched kernels:")
        for kernel, count in most_launched:
            print(f"    {count:6d}×  {kernel[:110]}")
        if args.ops_by_shape:
            report[name]["ops_by_shape"] = ops_by_shape(prof, args.top)
            print("  top operators by input shape (CUDA time including the operators they call):")
            for op, shapes, calls, ms in report[name]["ops_by_shape"]:
                print(f"    {ms:8.2f} ms  {calls:4d}×  {op}  {shapes[:120]}")
    report["device"] = torch.cuda.get_device_name()
    report["torch"] = torch.__version__
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="defmamba_small", choices=["defmamba_tiny", "defmamba_small", "defmamba_base"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--amp", default="float16", choices=["none", "float16", "bfloat16"])
    parser.add_argument("--backend", default="auto", choices=["auto", "cuda", "triton", "torch"])
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--no-cudnn-benchmark", dest="cudnn_benchmark", action="store_false",
                        help="keep cuDNN's heuristic algorithm choice (training enables autotuning)")
    parser.add_argument("--ops-by-shape", action="store_true",
                        help="also list the aten operators by input shape (which layer a kernel's time belongs to)")
    parser.add_argument("--out", help="write the report as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("profiling needs a CUDA GPU")
    report = run(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
