"""Throughput measurement shared by ``classification/main.py --throughput`` and ``tools/benchmark.py``.

Images per second are the median over repeated timed windows after a warm-up; GPU windows are
timed with CUDA events, CPU windows with ``time.perf_counter``. On GPU the peak memory of the
timed part is reported, and with CUDA graphs (``cuda_graphs``, or a model trained with graphed
training) that of the warm-up and the recording too: that is where a graph's memory is allocated.
"""
from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from typing import Callable, Optional, Union

import torch
from torch import nn

from .cuda_graphs import capture_cuda_graph, require_cuda_for_graphs

__all__ = ["event_time_ms", "host_cost", "measure_throughput"]

# CUDA runtime / driver calls that launch one kernel each (cuBLAS, cuDNN, ATen and Triton launches).
_LAUNCH_CALLS = frozenset({"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                           "cudaLaunchCooperativeKernel"})


def _autocast(device: torch.device, amp_dtype: Optional[torch.dtype], cache_enabled: bool = True):
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype, cache_enabled=cache_enabled)


def measure_throughput(model: nn.Module, batch_size: int, image_size: Union[int, tuple[int, int]] = 224,
                       mode: str = "infer", amp_dtype: Optional[torch.dtype] = None, warmup: int = 5,
                       repeats: int = 5, iters_per_window: int = 5, device: Union[str, torch.device, None] = None,
                       in_chans: int = 3, num_classes: Optional[int] = None, cuda_graphs: bool = False,
                       with_host_cost: bool = False) -> dict:
    """Images/s of ``model`` on random inputs.

    Args:
        model: the network; in "train" mode its weights are updated by AdamW (pass a copy to keep them).
        batch_size, image_size: input shape (B, in_chans, H, W); an int means a square image.
        mode: "infer" (forward under ``torch.inference_mode``) or "train" (forward, cross-entropy,
            backward, AdamW step (fused on the GPU); fp16 uses a GradScaler).
        amp_dtype: None (float32), torch.float16 or torch.bfloat16 autocast.
        warmup: untimed iterations first (also absorbs compilation and autotuning).
        repeats: timed windows; the result is their median. iters_per_window: iterations per window.
        device: where to run (default: the model's device).
        num_classes: logits of the model, for the training targets (default: inferred from one forward).
        cuda_graphs: record the whole step (in training: forward, loss, backward and a
            capturable AdamW step) into one CUDA graph and time its replays, which takes the host's
            launch cost out of the number (GPU only; see :func:`defmamba.cuda_graphs.capture_cuda_graph`).
        with_host_cost: also measure the eager step's kernel launches, host time and GPU busy time
            (:func:`host_cost`; GPU, without ``cuda_graphs``), added under those keys.

    Returns:
        dict with images_per_s (median), window_images_per_s, ms_per_iter, batch_size, image_size,
        mode, amp_dtype, device, cuda_graphs, and peak_memory_gib (GPU; None on CPU); with
        ``with_host_cost`` also launches_per_step, host_ms_per_step and gpu_ms_per_step.
    """
    if mode not in ("infer", "train"):
        raise ValueError(f"mode must be 'infer' or 'train', got {mode!r}")
    if amp_dtype not in (None, torch.float16, torch.bfloat16):
        raise ValueError(f"amp_dtype must be None, torch.float16 or torch.bfloat16, got {amp_dtype}")
    if batch_size < 1 or warmup < 0 or repeats < 1 or iters_per_window < 1:
        raise ValueError("batch_size, repeats and iters_per_window must be ≥ 1 and warmup ≥ 0")
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    if cuda_graphs:
        require_cuda_for_graphs(device)
    if with_host_cost and (device.type != "cuda" or cuda_graphs):
        raise ValueError("with_host_cost measures the eager step on a CUDA device; drop it for CPU or CUDA graphs")
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    model = model.to(device)
    images = torch.randn(batch_size, in_chans, height, width, device=device)
    on_gpu = device.type == "cuda"

    if mode == "infer":
        model.eval()

        def step() -> None:
            with torch.inference_mode(), _autocast(device, amp_dtype, cache_enabled=not cuda_graphs):
                model(images)
    else:
        model.train()
        if num_classes is None:
            with torch.no_grad(), _autocast(device, amp_dtype):
                num_classes = model(images[:1]).shape[-1]
        targets = torch.randint(0, num_classes, (batch_size,), device=device)
        # On the GPU the fused AdamW, as classification/main.py builds it; a graph replays the
        # optimizer too, so its step count must then live on the GPU (capturable).
        fused = on_gpu or None
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused, capturable=cuda_graphs)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        criterion = nn.CrossEntropyLoss()

        def step() -> None:
            with _autocast(device, amp_dtype, cache_enabled=not cuda_graphs):
                loss = criterion(model(images), targets)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

    # Replays allocate nothing: their memory is what the recording allocated, so with CUDA graphs (the
    # whole step, or a model's graphed training, recorded in the first warm-up step) the peak is
    # taken over the warm-up and the recording too.
    records_graphs = cuda_graphs or (mode == "train" and getattr(model, "graphed_training", False) is True)
    if records_graphs and on_gpu:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    if cuda_graphs:
        step = capture_cuda_graph(step, device)
    for _ in range(warmup):
        step()
    if on_gpu:
        torch.cuda.synchronize(device)
        if not records_graphs:
            torch.cuda.reset_peak_memory_stats(device)
    rates = []
    for _ in range(repeats):
        if on_gpu:
            seconds = event_time_ms(lambda: [step() for _ in range(iters_per_window)]) / 1000.0
        else:
            t0 = time.perf_counter()
            for _ in range(iters_per_window):
                step()
            seconds = time.perf_counter() - t0
        rates.append(batch_size * iters_per_window / seconds)
    median = statistics.median(rates)
    costs = host_cost(step, device) if with_host_cost else {}
    return {**costs,
        "mode": mode,
        "amp_dtype": None if amp_dtype is None else str(amp_dtype).replace("torch.", ""),
        "batch_size": batch_size,
        "image_size": [height, width],
        "device": str(device),
        "cuda_graphs": cuda_graphs,
        "images_per_s": median,
        "window_images_per_s": rates,
        "ms_per_iter": 1000.0 * batch_size / median,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if on_gpu else None,
    }


def host_cost(step: Callable[[], object], device: torch.device, steps: int = 5) -> dict:
    """What one eager call of ``step`` costs the host and the GPU (``step`` already warmed up).

    Returns launches_per_step (kernel launches the host issues: CUDA runtime/driver launch calls
    under the profiler), host_ms_per_step (median wall time for the host to issue one step,
    starting from an idle GPU, without waiting for it) and gpu_ms_per_step (median time the GPU
    is busy with the step's kernels and copies: the union of their intervals). A step whose
    host_ms exceeds its gpu_ms is host-bound: the GPU waits for launches.
    """
    from torch.profiler import ProfilerActivity, profile

    issue_ms = []
    for _ in range(steps):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        issue_ms.append(1000.0 * (time.perf_counter() - start))
    torch.cuda.synchronize(device)
    launches, busy_ms = [], []
    for _ in range(min(steps, 3)):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize(device)
        events = prof.events()
        launches.append(sum(1 for e in events if e.name in _LAUNCH_CALLS))
        busy_ms.append(_busy_ms([(e.time_range.start, e.time_range.end) for e in events
                                 if e.device_type == torch.autograd.DeviceType.CUDA]))
    return {"launches_per_step": int(statistics.median(launches)), "host_ms_per_step": statistics.median(issue_ms),
            "gpu_ms_per_step": statistics.median(busy_ms)}


def event_time_ms(fn: Callable[[], object]) -> float:
    """CUDA time of one call of ``fn`` on the current stream, from events around it."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _busy_ms(intervals: list[tuple[float, float]]) -> float:
    """Length (ms) of the union of (start, end) intervals given in microseconds."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total / 1000.0
