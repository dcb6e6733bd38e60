"""CUDA-graph training steps under DistributedDataParallel (NCCL): the recorded step, gradient
all-reduce included, trains as the eager DDP step does. One process, so it runs on one GPU; the
two-GPU run is measured with `torchrun --nproc_per_node 2 classification/main.py`."""
from __future__ import annotations

import copy
import socket

import pytest
import torch
import torch.distributed as dist
from graph_helpers import assert_trained_alike, run_steps
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from defmamba.train.engine import AmpSettings
from defmamba.train.train_step import DDP_WARMUP_STEPS, CudaGraphTrainStep, TrainStep

pytestmark = pytest.mark.cuda


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def nccl_group():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            device_id=torch.device("cuda", torch.cuda.current_device()))
    yield
    dist.destroy_process_group()


def _train(net: nn.Module, graphed: bool, batches, lrs, amp_dtype):
    """Losses and gradient norms of one step per batch, through DDP, eager or graphed."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        ddp = DistributedDataParallel(net, device_ids=[torch.cuda.current_device()], broadcast_buffers=False)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lrs[0], fused=True, capturable=True)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    amp = AmpSettings(amp_dtype is not None, amp_dtype or torch.float32)
    step = TrainStep(ddp, nn.CrossEntropyLoss(), optimizer, scaler, amp, clip_grad=1.0, ema_source=net)
    if graphed:
        step = CudaGraphTrainStep(step, warmup=3, stream=stream)
        assert step.warmup == DDP_WARMUP_STEPS
    losses, norms = run_steps(step, optimizer, batches, lrs)
    if graphed:
        assert step.graph is not None     # the last steps were replays
    return losses, norms


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16, torch.float16])
def test_graphed_ddp_step_follows_the_eager_ddp_steps(nccl_group, amp_dtype):
    import defmamba

    torch.manual_seed(0)
    model = defmamba.DefMamba(dims=32, depths=(1, 1, 1, 1), num_classes=5, drop_path_rate=0.0).cuda()
    twin = copy.deepcopy(model)
    steps = DDP_WARMUP_STEPS + 4          # warm-up, the recording, three replays
    batches = [(torch.randn(2, 3, 64, 96, device="cuda"), torch.randint(0, 5, (2,), device="cuda"))
               for _ in range(steps)]
    lrs = [1e-3 * 0.8 ** i for i in range(steps)]
    eager_losses, eager_norms = _train(model, False, batches, lrs, amp_dtype)
    graphed_losses, graphed_norms = _train(twin, True, batches, lrs, amp_dtype)
    # float32 atomics in the sampling backward: run-to-run noise (graph_helpers.assert_trained_alike)
    tol = 1e-4 if amp_dtype is None else 3e-3
    assert graphed_losses == pytest.approx(eager_losses, rel=tol)
    assert graphed_norms == pytest.approx(eager_norms, rel=tol)
    assert_trained_alike(model.named_parameters(), twin.parameters(), max_step_change=3 * lrs[0] * steps)


def test_a_ddp_model_must_name_its_stream(nccl_group):
    net = nn.Linear(4, 2).cuda()
    ddp = DistributedDataParallel(net, device_ids=[torch.cuda.current_device()])
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True, capturable=True)
    step = TrainStep(ddp, nn.CrossEntropyLoss(), optimizer, torch.amp.GradScaler("cuda", enabled=False),
                     AmpSettings(False, torch.float32))
    with pytest.raises(ValueError, match="stream it was built on"):
        CudaGraphTrainStep(step)
