"""One training step, run eagerly or replayed from a CUDA graph.

``TrainStep`` is the step itself: forward under autocast, loss, scaled backward and, on the last
micro-batch of an accumulation cycle, the update (unscale, clip, AdamW, GradScaler update, EMA).
``CudaGraphTrainStep`` records one whole step into a CUDA graph and replays it for every later
batch, so the host no longer launches the step's thousands of kernels one by one.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Optional

import torch
from torch import nn

from ..cuda_graphs import CudaGraphError, record_graph, side_stream

__all__ = ["CudaGraphError", "CudaGraphTrainStep", "DDP_WARMUP_STEPS", "TrainStep"]

# Eager steps a DistributedDataParallel model takes before its step is recorded: DDP rebuilds its
# gradient buckets after the first iterations, and the recorded all-reduces must see the final ones.
DDP_WARMUP_STEPS = 11


class TrainStep:
    """Forward, loss and backward of one micro-batch; the optimizer update on the cycle's last one.

    Args:
        model: the network to train (a DistributedDataParallel wrapper is fine).
        criterion: loss of (float32 logits, targets).
        optimizer, scaler: the optimizer and the GradScaler (disabled unless fp16 autocast).
        amp: autocast settings (``engine.AmpSettings``).
        clip_grad: largest global gradient norm; 0 disables clipping (the norm is still returned).
        accumulation: micro-batches per optimizer step (the loss is divided by it).
        model_ema, ema_source: an EMA updated from ``ema_source`` (default: ``model``) after each update.
        backward_on_calling_thread: run the backward on this thread, not on autograd's per-device
            worker thread (``torch.autograd.set_multithreading_enabled(False)`` around it); the
            hand-over to that thread costs an eager DefMamba step much host time.
    """

    def __init__(self, model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, amp, clip_grad: float = 0.0, accumulation: int = 1,
                 model_ema=None, ema_source: Optional[nn.Module] = None,
                 backward_on_calling_thread: bool = True) -> None:
        self.model, self.criterion, self.optimizer, self.scaler, self.amp = model, criterion, optimizer, scaler, amp
        self.max_norm = clip_grad if clip_grad > 0 else math.inf
        self.accumulation = accumulation
        self.model_ema, self.ema_source = model_ema, ema_source if ema_source is not None else model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.autocast_cache = True  # off while a CUDA graph is recorded (cached casts would not outlive it)
        self.backward_on_calling_thread = backward_on_calling_thread

    def backward(self, samples: torch.Tensor, targets: torch.Tensor, sync_grads: bool = True) -> torch.Tensor:
        """Forward and backward of one micro-batch; gradients add up until :meth:`update`. Returns the
        (undivided, detached) loss. ``sync_grads=False`` skips DDP's all-reduce for this micro-batch."""
        no_sync = getattr(self.model, "no_sync", None)
        with nullcontext() if sync_grads or no_sync is None else no_sync():
            device = samples.device
            with self.amp.autocast(device, cache_enabled=self.autocast_cache):
                outputs = self.model(samples)
            loss = self.criterion(outputs.float(), targets)
            with torch.autograd.set_multithreading_enabled(not self.backward_on_calling_thread):
                self.scaler.scale(loss / self.accumulation).backward()
        return loss.detach()

    def update(self) -> torch.Tensor:
        """Unscale, clip, step the optimizer and the GradScaler, clear the gradients, update the EMA.
        Returns the global gradient norm before clipping (infinite on an fp16 step the scaler skips)."""
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.model_ema is not None:
            self.model_ema.update(self.ema_source)
        return norm.detach()

    steps_before_replay = 0  # eager steps run every step (CudaGraphTrainStep's count is its warm-up)

    def __call__(self, samples: torch.Tensor, targets: torch.Tensor,
                 update: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One micro-batch; with ``update`` the optimizer steps after it. Returns (loss, norm or None)."""
        loss = self.backward(samples, targets, sync_grads=update)
        return loss, self.update() if update else None


def _graph_device(*tensors: torch.Tensor) -> bool:
    """Whether the tensors are where CUDA graphs can record them (on a CUDA device)."""
    return all(t.is_cuda for t in tensors)


class CudaGraphTrainStep:
    """A :class:`TrainStep` (one micro-batch per update) replayed from a CUDA graph.

    The first ``warmup`` batches train eagerly on a side stream, which settles cuDNN autotuning,
    Triton compilation and the optimizer's and GradScaler's state. The next batch is copied into
    static input buffers and the whole step (forward to EMA update) is recorded; from then on each
    batch is copied into those buffers and the graph replayed. The learning rate of every parameter
    group is read from a device tensor that is refreshed from ``param_groups`` before each replay,
    so the schedule keeps working; everything else the graph reads is fixed when it is recorded
    (batch shape, weight decay, the model's train mode). The optimizer must be ``capturable``.

    Under DistributedDataParallel the gradient all-reduce is recorded too (NCCL collectives can be
    captured): build the DDP wrapper while ``stream`` is the current stream and pass that stream
    here, so that warm-up, DDP's setup and the recording share it; such a model takes at least
    :data:`DDP_WARMUP_STEPS` eager steps first. Every rank records and replays the same step.
    """

    def __init__(self, step: TrainStep, warmup: int = 3, stream: Optional[torch.cuda.Stream] = None) -> None:
        if step.accumulation != 1:
            raise ValueError("CUDA graphs record one micro-batch per optimizer step; set TRAIN.ACCUMULATION_STEPS 1")
        if not all(group.get("capturable") for group in step.optimizer.param_groups):
            raise ValueError("the optimizer must be built with capturable=True to be recorded into a CUDA graph")
        if warmup < 1:
            raise ValueError(f"warmup must be ≥ 1 (the state the graph relies on is created there), got {warmup}")
        if isinstance(step.model, torch.nn.parallel.DistributedDataParallel):
            if stream is None:
                raise ValueError("a DDP model is recorded on the stream it was built on: build it under "
                                 "`with torch.cuda.stream(stream)` and pass that stream")
            warmup = max(warmup, DDP_WARMUP_STEPS)
        self.step, self.warmup = step, warmup
        self.eager_steps = 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self._side_stream = stream

    @property
    def steps_before_replay(self) -> int:
        """Batches still to come before the first replay: the eager warm-up and the recording."""
        return 0 if self.graph is not None else self.warmup - self.eager_steps + 1

    @property
    def model(self) -> nn.Module:
        return self.step.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.step.optimizer

    @property
    def scaler(self) -> torch.amp.GradScaler:
        return self.step.scaler

    def __call__(self, samples: torch.Tensor, targets: torch.Tensor,
                 update: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        if not update:
            raise ValueError("CUDA graphs record one micro-batch per optimizer step; set TRAIN.ACCUMULATION_STEPS 1")
        if not _graph_device(samples):
            raise ValueError(f"CUDA graphs need CUDA tensors, got a batch on {samples.device}")
        if self.graph is None and self.eager_steps < self.warmup:
            return self._eager(samples, targets)
        if self.graph is None:
            self._record(samples, targets)
        else:
            self._load(samples, targets)
        for value, group in zip(self._lrs, self.step.optimizer.param_groups):
            value.fill_(float(group["lr"]))
        self.graph.replay()
        return self._loss.clone(), self._norm.clone()

    def _eager(self, samples, targets):
        self.eager_steps += 1
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(samples.device)
        with side_stream(samples.device, self._side_stream):
            return self.step(samples, targets)

    def _record(self, samples, targets):
        self._samples, self._targets = samples.clone(), targets.clone()
        groups = self.step.optimizer.param_groups
        self._lrs = [torch.tensor(float(g["lr"]), dtype=torch.float32, device=samples.device) for g in groups]
        scheduled = [g["lr"] for g in groups]
        for group, value in zip(groups, self._lrs):
            group["lr"] = value  # the recorded AdamW reads this tensor; the scheduler keeps writing floats
        self.step.autocast_cache = False
        try:
            torch.cuda.synchronize(samples.device)
            # thread_local: the data loader's pin-memory thread may allocate host memory meanwhile
            self.graph, (self._loss, self._norm) = record_graph(lambda: self.step(self._samples, self._targets),
                                                                capture_error_mode="thread_local",
                                                                stream=self._side_stream)
        except CudaGraphError as err:
            raise CudaGraphError(f"{err} (training: turn TRAIN.CUDA_GRAPHS off)") from err
        finally:
            self.step.autocast_cache = True
            for group, value in zip(groups, scheduled):
                group["lr"] = value

    def _load(self, samples, targets):
        if samples.shape != self._samples.shape or targets.shape != self._targets.shape:
            raise CudaGraphError(f"a CUDA graph replays one batch shape: recorded {tuple(self._samples.shape)} / "
                             f"{tuple(self._targets.shape)}, got {tuple(samples.shape)} / {tuple(targets.shape)} "
                             "(keep drop_last and a fixed batch size)")
        self._samples.copy_(samples)
        self._targets.copy_(targets.to(self._targets.dtype))
