"""What the benchmark scripts in tools/ share: the names of the measured modes, CUDA-event timing,
one variant measured on the GPU, and the markdown row of an A/B comparison.

Not a script: ``tools/benchmark*.py`` import it as their neighbour (``python tools/x.py`` puts
tools/ first on the import path). The measurement itself is the library's
:func:`defmamba.benchmark.measure_throughput`, which ``classification/main.py --throughput`` uses too.
"""
from __future__ import annotations

import statistics
from typing import Callable

import torch

import defmamba
from defmamba.benchmark import event_time_ms, measure_throughput

__all__ = ["MODES", "ab_table_row", "cuda_time_ms", "measure_model"]

# Benchmark mode name → (measure_throughput's mode, autocast dtype or None).
MODES = {
    "infer_fp32": ("infer", None), "infer_fp16": ("infer", torch.float16), "infer_bf16": ("infer", torch.bfloat16),
    "train_fp32": ("train", None), "train_fp16": ("train", torch.float16), "train_bf16": ("train", torch.bfloat16),
}


def cuda_time_ms(fn: Callable[[], object], warmup: int = 5, repeats: int = 20) -> float:
    """Median CUDA-event time (ms) of ``fn`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(event_time_ms(fn) for _ in range(repeats))


def measure_model(name: str, mode: str, batch_size: int = 128, warmup: int = 3, repeats: int = 5,
                  iters_per_window: int = 3) -> dict:
    """``measure_throughput`` of a freshly built DefMamba variant on the GPU at 224² in one of
    :data:`MODES`; the model is freed afterwards (A/B runs measure one model after another)."""
    kind, amp_dtype = MODES[mode]
    model = defmamba.build_model(name).cuda()
    try:
        return measure_throughput(model, batch_size, 224, mode=kind, amp_dtype=amp_dtype, warmup=warmup,
                                  repeats=repeats, iters_per_window=iters_per_window)
    finally:
        del model
        torch.cuda.empty_cache()


def ab_table_row(model: str, mode: str, base: dict, new: dict) -> str:
    """A markdown row of an A/B: model, mode, both images/s, the change and both peaks (GiB)."""
    peaks = "/".join(f"{r['peak_memory_gib']:.2f}" if r.get("peak_memory_gib") else "-" for r in (base, new))
    return (f"| {model} | {mode} | {base['images_per_s']:.1f} | {new['images_per_s']:.1f} | "
            f"{new['images_per_s'] / base['images_per_s'] - 1:+.1%} | {peaks} |")
