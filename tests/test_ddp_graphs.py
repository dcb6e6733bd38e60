"""CUDA-graph training steps under DistributedDataParallel: the recorded step, gradient all-reduce
included, trains as the eager DDP step does. One process: on one GPU under NCCL, and on the CPU
under gloo with emulated graphs (tests/graph_emulation.py); the two-GPU run is measured with
`torchrun --nproc_per_node 2 classification/main.py`."""
from __future__ import annotations

import copy
import socket

import pytest
import torch
import torch.distributed as dist
from graph_helpers import assert_trained_alike, assert_trained_identically, run_steps
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from defmamba.train.engine import AmpSettings
from defmamba.train.train_step import DDP_WARMUP_STEPS, CudaGraphTrainStep, TrainStep

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def process_group(graph_device):
    """A one-process group: NCCL on the GPU, gloo on the CPU."""
    if graph_device == "cuda":
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                                device_id=torch.device("cuda", torch.cuda.current_device()))
    else:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    yield graph_device
    dist.destroy_process_group()


def _device_ids(device: str):
    return [torch.cuda.current_device()] if device == "cuda" else None


def _train(net: nn.Module, graphed: bool, batches, lrs, amp_dtype, device: str):
    """Losses and gradient norms of one step per batch, through DDP, eager or graphed."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        ddp = DistributedDataParallel(net, device_ids=_device_ids(device), broadcast_buffers=False)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lrs[0], fused=True, capturable=True)
    scaler = torch.amp.GradScaler(device, enabled=amp_dtype == torch.float16)
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
def test_graphed_ddp_step_follows_the_eager_ddp_steps(process_group, amp_dtype):
    import defmamba

    device = process_group
    torch.manual_seed(0)
    model = defmamba.DefMamba(dims=32, depths=(1, 1, 1, 1), num_classes=5, drop_path_rate=0.0).to(device)
    twin = copy.deepcopy(model)
    steps = DDP_WARMUP_STEPS + 4          # warm-up, the recording, three replays
    batches = [(torch.randn(2, 3, 64, 96, device=device), torch.randint(0, 5, (2,), device=device))
               for _ in range(steps)]
    # float32 values: the recorded AdamW reads each from a float32 tensor, the eager one as a float
    lrs = [torch.tensor(1e-3 * 0.8 ** i).item() for i in range(steps)]
    eager_losses, eager_norms = _train(model, False, batches, lrs, amp_dtype, device)
    graphed_losses, graphed_norms = _train(twin, True, batches, lrs, amp_dtype, device)
    if device == "cpu":
        assert (graphed_losses, graphed_norms) == (eager_losses, eager_norms)
        assert_trained_identically(model.named_parameters(), twin.parameters())
        return
    # float32 atomics in the sampling backward: run-to-run noise (graph_helpers.assert_trained_alike)
    tol = 1e-4 if amp_dtype is None else 3e-3
    assert graphed_losses == pytest.approx(eager_losses, rel=tol)
    assert graphed_norms == pytest.approx(eager_norms, rel=tol)
    assert_trained_alike(model.named_parameters(), twin.parameters(), max_step_change=3 * lrs[0] * steps)


def test_a_ddp_model_must_name_its_stream(process_group):
    device = process_group
    net = nn.Linear(4, 2).to(device)
    ddp = DistributedDataParallel(net, device_ids=_device_ids(device))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True, capturable=True)
    step = TrainStep(ddp, nn.CrossEntropyLoss(), optimizer, torch.amp.GradScaler(device, enabled=False),
                     AmpSettings(False, torch.float32))
    with pytest.raises(ValueError, match="stream it was built on"):
        CudaGraphTrainStep(step)


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_main_keeps_eager_ddp_gradients_in_the_buckets(process_group, cuda_graphs):
    """main.py's eager DDP step keeps each gradient as a view of DDP's all-reduce bucket (no copy of
    the reduced buckets back into the gradients, a kernel launch per parameter) and trains exactly
    as DDP with gradients of their own; a recorded step keeps them apart (the layout its GPU test
    verified)."""
    import logging

    import defmamba
    from defmamba.train import config as app_config
    from defmamba.train import main as app_main
    from defmamba.train.utils.distributed import DistInfo

    device = process_group
    torch.manual_seed(0)
    model = defmamba.DefMamba(dims=32, depths=(1, 1, 1, 1), num_classes=5, drop_path_rate=0.0).to(device)
    twin = copy.deepcopy(model)
    config = app_config.default_config()
    config.TRAIN.CUDA_GRAPHS, config.TRAIN.CLIP_GRAD = cuda_graphs, 1.0
    index = torch.cuda.current_device() if device == "cuda" else 0
    info = DistInfo(rank=0, world_size=1, local_rank=index, device=torch.device(device, index))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True, capturable=True)  # as _train's
    amp = AmpSettings(False, torch.float32)
    built = app_main._build_train_step(config, model, model, None, optimizer, torch.amp.GradScaler(device, enabled=False),
                                       nn.CrossEntropyLoss(), amp, info, logging.getLogger("test"))
    assert built.model.gradient_as_bucket_view is not cuda_graphs
    if cuda_graphs:
        return
    batches = [(torch.randn(2, 3, 64, 96, device=device), torch.randint(0, 5, (2,), device=device)) for _ in range(4)]
    lrs = [1e-3] * len(batches)
    losses, norms = run_steps(built, optimizer, batches[:-1], lrs[:-1])
    loss = built.backward(*batches[-1])
    assert all(p.grad._base is not None for p in model.parameters())   # views of the buckets
    losses.append(loss.item())
    norms.append(built.update().item())
    twin_losses, twin_norms = _train(twin, False, batches, lrs, None, device)   # DDP's default: copies
    if device == "cpu":
        assert (losses, norms) == (twin_losses, twin_norms)
        assert_trained_identically(model.named_parameters(), twin.parameters())
    else:
        assert losses == pytest.approx(twin_losses, rel=1e-4) and norms == pytest.approx(twin_norms, rel=1e-4)
        assert_trained_alike(model.named_parameters(), twin.parameters(), max_step_change=3e-3 * len(batches))
