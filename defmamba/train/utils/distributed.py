"""Process-group setup for plain runs, ``torch.distributed.launch`` and ``torchrun``."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "all_reduce_sum", "sum_over_ranks", "all_ranks_ok", "barrier", "cleanup",
           "is_distributed", "world_size"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(local_rank_arg: int | None = None) -> DistInfo:
    """Join the process group the launcher describes (RANK/WORLD_SIZE/LOCAL_RANK in the environment).

    Without a launcher the run is a single plain process and no process group is created.
    NCCL is used when CUDA is available, gloo otherwise.
    """
    use_cuda = torch.cuda.is_available()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank = int(os.environ["RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        if not is_distributed():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://",
                                    world_size=world_size, rank=rank)
    else:
        rank, world_size, local_rank = 0, 1, 0
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def world_size() -> int:
    """Number of processes in the group (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks (identity without a process group)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def sum_over_ranks(value: int) -> int:
    """``value`` summed over all ranks (a collective: every rank must call it)."""
    if not is_distributed():
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    total = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return int(total.item())


def all_ranks_ok(ok: bool) -> bool:
    """True when ``ok`` holds on every rank, so that all ranks stop together when one cannot go on."""
    return sum_over_ranks(0 if ok else 1) == 0


def barrier() -> None:
    """Wait for every rank (nothing without a process group). Under NCCL on this process's own GPU,
    named, not guessed from the current device (which PyTorch warns about)."""
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()
