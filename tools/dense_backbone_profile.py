"""Backbone training step at detection/segmentation sizes: wall time, GPU time and the top kernels.

One forward and backward of a dense-prediction backbone (the sum of its feature maps' means as the
loss) under fp16 autocast, in training mode, on a batch of B × 3 × H × W: the median wall time of
the step after warm-up, the GPU's busy time (the union of its kernel intervals under
``torch.profiler``), kernel launches and peak memory, and the kernels that take the most GPU time.
DefMamba variants run as :class:`~defmamba.DefMambaBackbone`, timm models (ConvNeXt, ...) with
``features_only=True``; ``+compile`` after a DefMamba name compiles its token mixers (regional).

    python tools/dense_backbone_profile.py --models defmamba_small convnext_small --batch 2 \
        --height 800 --width 1344 --json dense.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import timm
import torch
from torch.profiler import ProfilerActivity, profile

from defmamba import DefMambaBackbone
from defmamba.regional_compile import compile_token_mixers
from defmamba.variants import VARIANTS


def make_backbone(name: str, drop_path_rate: float) -> torch.nn.Module:
    """The backbone ``name`` on the GPU: a DefMamba variant (``defmamba_small``, optionally
    ``+compile``) or any timm model that has ``features_only``."""
    base, _, option = name.partition("+")
    if option not in ("", "compile"):
        raise SystemExit(f"{name}: the only option after '+' is 'compile'")
    variant = base.removeprefix("defmamba_")
    if base.startswith("defmamba_"):
        if variant not in VARIANTS:
            raise SystemExit(f"{name}: DefMamba variants are {', '.join('defmamba_' + v for v in VARIANTS)}")
        spec = VARIANTS[variant]
        model = DefMambaBackbone(dims=spec.dims, depths=spec.depths, drop_path_rate=drop_path_rate).cuda()
        if option:
            compile_token_mixers(model)
        return model
    if option:
        raise SystemExit(f"{name}: '+compile' compiles DefMamba's token mixers; use it with a DefMamba variant")
    return timm.create_model(base, features_only=True, drop_path_rate=drop_path_rate).cuda()


def _busy_ms(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of (start, end) intervals, µs in, ms out."""
    busy, current = 0.0, None
    for start, end in sorted(intervals):
        if current is None or start > current[1]:
            if current is not None:
                busy += current[1] - current[0]
            current = [start, end]
        else:
            current[1] = max(current[1], end)
    if current is not None:
        busy += current[1] - current[0]
    return busy / 1e3


def measure(model: torch.nn.Module, images: torch.Tensor, warmup: int, repeats: int, top: int) -> dict:
    def step() -> None:
        with torch.autocast("cuda", dtype=torch.float16):
            features = model(images)
        sum(f.float().mean() for f in features).backward()

    model.train()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - start) * 1e3)
    profiled = 3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(profiled):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per_kernel: dict[str, list] = {}
    for event in kernels:
        entry = per_kernel.setdefault(event.name[:100], [0, 0.0])
        entry[0] += 1
        entry[1] += event.time_range.end - event.time_range.start
    ranked = sorted(per_kernel.items(), key=lambda item: -item[1][1])[:top]
    return {"wall_ms": statistics.median(walls),
            "gpu_busy_ms": _busy_ms([(e.time_range.start, e.time_range.end) for e in kernels]) / profiled,
            "launches": len(kernels) / profiled,
            "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
            "top_kernels": [{"name": name, "calls": calls / profiled, "ms": total / profiled / 1e3}
                            for name, (calls, total) in ranked]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["defmamba_small", "convnext_small"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1344)
    parser.add_argument("--drop-path-rate", type=float, default=0.2)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--top", type=int, default=12, help="kernels listed per model")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("dense_backbone_profile.py measures on a GPU; none is visible")
    torch.backends.cudnn.benchmark = True
    torch.autograd.set_multithreading_enabled(False)  # every backward on this thread, as the mm runners train
    images = torch.randn(args.batch, 3, args.height, args.width, device="cuda")
    results = {}
    for name in args.models:
        model = make_backbone(name, args.drop_path_rate)
        result = results[name] = measure(model, images, args.warmup, args.repeats, args.top)
        print(f"{name} {args.batch}×3×{args.height}×{args.width}: {result['wall_ms']:.1f} ms wall, "
              f"{result['gpu_busy_ms']:.1f} ms GPU, {result['launches']:.0f} kernels, {result['peak_gib']:.2f} GiB")
        for kernel in result["top_kernels"]:
            print(f"  {kernel['ms']:8.2f} ms {kernel['calls']:6.0f}×  {kernel['name']}")
        del model
        torch.cuda.empty_cache()
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "settings": settings,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
