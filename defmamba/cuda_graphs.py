"""Recording a step (forward, or a whole training step) into a CUDA graph and replaying it.

A replay launches every recorded kernel at once, with none of the host's per-kernel Python and
launch cost: the way to see, and to get, the GPU's own time per step for host-bound models.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, TypeVar, Union

import torch

__all__ = ["AFTER_A_FAILED_RECORDING", "CudaGraphError", "HOST_SYNC_OPS", "capture_cuda_graph", "record_graph",
           "require_cuda_for_graphs", "side_stream"]

T = TypeVar("T")

# ATen operators that make the host wait for the GPU: they read a tensor's values on the host
# (``.item()``, ``bool(t)``) or size their output by them. A stream capture refuses them, and one in
# an eager step stalls a host-bound pipeline.
HOST_SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_dim",
                           "unique_consecutive", "equal", "repeat_interleave"})


class CudaGraphError(RuntimeError):
    """A step could not be recorded into a CUDA graph (an operation that a graph cannot hold)."""


def require_cuda_for_graphs(device: torch.device) -> None:
    """Raise a ValueError naming ``device`` unless it is a CUDA device."""
    if device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, got {device}; run without CUDA graphs there")


def capture_cuda_graph(step: Callable[[], object], device: Union[str, torch.device],
                       warmup: int = 3) -> Callable[[], None]:
    """Record one call of ``step`` into a CUDA graph and return a function that replays it.

    ``step`` first runs ``warmup`` times on a side stream, so that cuDNN autotuning, Triton
    compilation, optimizer state and the allocator settle outside the graph. The step must keep
    to what a graph can replay: fixed shapes, inputs read from tensors that outlive it, no
    host synchronisation (``.item()``, printing a tensor), and an optimizer built with
    ``capturable=True`` (or ``fused=True``) if it steps one. Each replay then repeats the recorded
    kernels with no Python or launch cost, on the same memory.
    """
    device = torch.device(device)
    require_cuda_for_graphs(device)
    if warmup < 1:
        raise ValueError(f"warmup must be ≥ 1 (state the graph relies on is created there), got {warmup}")
    with side_stream(device):
        for _ in range(warmup):
            step()
    graph, _ = record_graph(step)
    return graph.replay


@contextlib.contextmanager
def side_stream(device: torch.device, stream: Optional[torch.cuda.Stream] = None) -> Iterator[torch.cuda.Stream]:
    """Run the block on ``stream`` (a new one if None), after the work already queued on the current
    stream, which waits for the block's work afterwards: where warm-up runs go before a recording, as
    ``torch.cuda.graph`` asks. Yields the stream."""
    current = torch.cuda.current_stream(device)
    stream = stream if stream is not None else torch.cuda.Stream(device)
    stream.wait_stream(current)
    try:
        with torch.cuda.stream(stream):
            yield stream
    finally:
        current.wait_stream(stream)


# The second half of every failed recording's message: PyTorch (2.11) leaves its CUDA random-number
# generator in recording mode when a capture fails, and the process's next random draw on the GPU
# fails with "Offset increment outside graph capture encountered unexpectedly".
AFTER_A_FAILED_RECORDING = ("in a new process: after a failed recording PyTorch's CUDA random-number generator "
                            "can stay in recording mode ('Offset increment outside graph capture')")


def record_graph(fn: Callable[[], T], capture_error_mode: str = "global", stream: Optional[torch.cuda.Stream] = None,
                 pool: Optional[tuple] = None) -> tuple[torch.cuda.CUDAGraph, T]:
    """Record one call of ``fn`` (already warmed up) into a new CUDA graph; returns the graph and
    what the recorded call returned (tensors the replays overwrite in place). A failure to record
    is a :class:`CudaGraphError` naming the fix. ``capture_error_mode`` as for ``torch.cuda.graph``
    ("thread_local" lets other threads, such as a data loader's, use CUDA meanwhile). ``stream``:
    the stream to record on (default: PyTorch's capture stream); a DDP model must be recorded on
    the stream it was built and warmed up on. ``pool``: the memory pool of another graph (its
    ``pool()``) that this one shares, replayed in recording order."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode=capture_error_mode):
            result = fn()
    except RuntimeError as err:
        raise CudaGraphError(f"recording the step into a CUDA graph failed ({err}); run it without CUDA graphs, "
                             f"{AFTER_A_FAILED_RECORDING}") from err
    return graph, result
