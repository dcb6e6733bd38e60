"""One training epoch and one evaluation pass."""
from __future__ import annotations

import datetime
import logging
import math
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from timm.utils import AverageMeter
from torch import nn

from .utils.distributed import all_reduce_sum, world_size

__all__ = ["AmpSettings", "train_one_epoch", "validate", "memory_mb"]


@dataclass(frozen=True)
class AmpSettings:
    """Autocast on/off and its dtype; fp16 trains with a GradScaler, bf16 without."""
    enabled: bool
    dtype: torch.dtype

    def autocast(self, device: torch.device, cache_enabled: bool = True):
        if not self.enabled:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype, cache_enabled=cache_enabled)

    @property
    def uses_scaler(self) -> bool:
        return self.enabled and self.dtype == torch.float16


def memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device``, or the process's peak resident memory on CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _PendingStats:
    """Per-step losses and gradient norms held as device tensors until the next check, so that the
    training loop does not wait for the GPU at every step (one transfer per check instead)."""

    def __init__(self) -> None:
        self.losses: list[tuple[int, int, torch.Tensor]] = []
        self.norms: list[torch.Tensor] = []

    def add_loss(self, idx: int, loss: torch.Tensor, count: int) -> None:
        self.losses.append((idx, count, loss.detach().float().reshape(1)))

    def add_norm(self, norm: torch.Tensor) -> None:
        self.norms.append(norm.detach().float().reshape(1))

    def flush(self, loss_meter: AverageMeter, norm_meter: AverageMeter, epoch: int) -> None:
        """Move the held values to the meters; a non-finite loss stops training with the step it came from."""
        if not self.losses and not self.norms:
            return
        values = torch.cat([loss for _, _, loss in self.losses] + self.norms).tolist()
        losses, norms = values[:len(self.losses)], values[len(self.losses):]
        for (idx, count, _), value in zip(self.losses, losses):
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"training loss is {value} at epoch {epoch} iteration {idx}; lower TRAIN.BASE_LR, keep "
                    "TRAIN.CLIP_GRAD > 0, or train in float32 with --disable_amp")
            loss_meter.update(value, count)
        for value in norms:
            if math.isfinite(value):  # an fp16 step the GradScaler skipped has an infinite norm
                norm_meter.update(value)
        self.losses, self.norms = [], []


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_one_epoch(config, train_step, loader, epoch: int, mixup_fn, lr_scheduler, device: torch.device,
                    logger: logging.Logger, tb_writer=None) -> dict:
    """Train ``epoch`` with ``train_step`` (a ``TrainStep`` or ``CudaGraphTrainStep``); the optimizer
    steps every ACCUMULATION_STEPS batches and the learning rate is set per optimizer step. Returns
    the epoch's mean loss, mean gradient norm, last learning rate and images/s.

    The loop reads losses and gradient norms back from the GPU only every few steps (at most
    PRINT_FREQ), so the host keeps queueing work instead of waiting for each step to finish; a
    non-finite loss is reported with the iteration it came from when it is read."""
    optimizer, scaler = train_step.optimizer, train_step.scaler
    train_step.model.train()
    optimizer.zero_grad(set_to_none=True)
    accum = config.TRAIN.ACCUMULATION_STEPS
    steps_per_epoch = len(loader) // accum
    used_batches = steps_per_epoch * accum
    first_step = epoch * steps_per_epoch
    lr_scheduler.step_update(first_step)
    if used_batches < len(loader):
        logger.info(f"the last {len(loader) - used_batches} batch(es) of the epoch do not fill an accumulation "
                    f"cycle of {accum} and are skipped")
    check_every = max(1, min(config.PRINT_FREQ, 50))
    loss_meter, norm_meter = AverageMeter(), AverageMeter()
    pending = _PendingStats()
    # Excluded from the images/s figure: compilation and autotuning (the first 10 batches, a fifth
    # of a shorter epoch), and all of a CUDA graph's eager warm-up and recording (12 batches under
    # DDP), however short the epoch; an epoch that is all warm-up is timed whole, and says so.
    graph_warmup = train_step.steps_before_replay
    warmup_batches = max(min(10, used_batches // 5), graph_warmup)
    timed_whole = warmup_batches >= used_batches
    if timed_whole:
        warmup_batches = 0
    start = time.time()
    steady_start = window_start = start
    window_first = 0
    for idx, (samples, targets) in enumerate(loader):
        if idx >= used_batches:
            break
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        loss, norm = train_step(samples, targets, update=(idx + 1) % accum == 0)
        pending.add_loss(idx, loss, targets.size(0))
        if norm is not None:
            pending.add_norm(norm)
            lr_scheduler.step_update(first_step + (idx + 1) // accum)
        last = idx == used_batches - 1
        printing = idx % config.PRINT_FREQ == 0 or last
        if printing or (idx + 1) % check_every == 0 or idx + 1 == warmup_batches:
            pending.flush(loss_meter, norm_meter, epoch)
        if idx + 1 == warmup_batches:
            _synchronize(device)
            steady_start = time.time()
        if printing:
            now = time.time()
            window_time = (now - window_start) / (idx + 1 - window_first)
            mean_time = (now - start) / (idx + 1)
            window_start, window_first = now, idx + 1
            lr = optimizer.param_groups[0]["lr"]
            eta = datetime.timedelta(seconds=int(mean_time * (used_batches - idx - 1)))
            scale = f"loss_scale {scaler.get_scale():.0f}\t" if scaler.is_enabled() else ""
            logger.info(
                f"Train: [{epoch}/{config.TRAIN.EPOCHS}][{idx}/{used_batches}]\t"
                f"eta {eta} lr {lr:.6f}\ttime {window_time:.4f} ({mean_time:.4f})\t"
                f"loss {loss_meter.val:.4f} ({loss_meter.avg:.4f})\t"
                f"grad_norm {norm_meter.val:.4f} ({norm_meter.avg:.4f})\t{scale}mem {memory_mb(device):.0f}MB")
            if tb_writer is not None:
                global_iter = epoch * used_batches + idx
                tb_writer.add_scalar("train/loss", loss_meter.val, global_iter)
                tb_writer.add_scalar("train/lr", lr, global_iter)
                tb_writer.add_scalar("train/grad_norm", norm_meter.val, global_iter)
    _synchronize(device)
    end = time.time()
    steady_images = (used_batches - warmup_batches) * config.DATA.BATCH_SIZE * world_size()
    images_per_s = steady_images / max(end - steady_start, 1e-9)
    logger.info(f"EPOCH {epoch} training took {datetime.timedelta(seconds=int(end - start))}, "
                f"{images_per_s:.1f} images/s over all processes "
                + ("(the whole epoch, a CUDA graph's warm-up included)" if timed_whole
                   else f"(after the first {warmup_batches} batches)"))
    return {"loss": loss_meter.avg, "grad_norm": norm_meter.avg, "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": images_per_s}


@torch.no_grad()
def validate(loader, model: nn.Module, amp: AmpSettings, device: torch.device, logger: logging.Logger,
             label: str = "model", print_freq: int = 10) -> dict:
    """Top-1/top-5 accuracy (%) and mean cross-entropy over the whole validation set, summed over ranks."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    totals = torch.zeros(4, dtype=torch.float64, device=device)   # loss sum, top-1, top-5, count
    for idx, (images, targets) in enumerate(loader):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with amp.autocast(device):
            output = model(images)
        output = output.float()
        k = min(5, output.shape[1])
        top = output.topk(k, dim=1).indices
        hits = top.eq(targets[:, None])
        totals += torch.stack([criterion(output, targets).double(), hits[:, :1].sum().double(),
                               hits.sum().double(), torch.tensor(float(len(targets)), dtype=torch.float64, device=device)])
        if idx % print_freq == 0:
            logger.info(f"Test ({label}): [{idx}/{len(loader)}]\tmem {memory_mb(device):.0f}MB")
    all_reduce_sum(totals)
    loss_sum, top1, top5, count = totals.tolist()
    if count == 0:
        raise RuntimeError("the validation set is empty")
    result = {"acc1": 100.0 * top1 / count, "acc5": 100.0 * top5 / count, "loss": loss_sum / count, "count": int(count)}
    logger.info(f" * {label}: Acc@1 {result['acc1']:.3f} Acc@5 {result['acc5']:.3f} loss {result['loss']:.4f} "
                f"on {result['count']} images")
    return result
