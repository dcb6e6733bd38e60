"""Graphed training: a DefMamba model's training forward and backward replayed from CUDA graphs
inside an eager loop (defmamba/graphed_training.py), against the same steps run eagerly."""
from __future__ import annotations

import collections
import copy
import pickle
import socket
import warnings

import pytest
import torch

import defmamba
from defmamba.graphed_training import GraphedTraining
from graph_helpers import amp_step, assert_trained_alike, assert_trained_identically


def _small_model(seed: int, device: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return defmamba.DefMamba(dims=32, depths=(1, 1, 1, 1), num_classes=10, drop_path_rate=0.0, **kwargs).to(device)


def _graphs(model: torch.nn.Module) -> GraphedTraining:
    return model.__dict__["_graphed_training"]


# --- CPU: what turning it on must not change ---------------------------------------------------

def test_graphed_training_changes_nothing_off_the_gpu():
    model = _small_model(0, "cpu")
    reference = copy.deepcopy(model)
    model.set_graphed_training()
    assert list(model.state_dict()) == list(reference.state_dict())
    images = torch.randn(2, 3, 64, 96)
    torch.testing.assert_close(model(images), reference(images), rtol=0, atol=0)
    assert _graphs(model).signatures == 0  # CPU inputs run eagerly


def test_a_copy_records_graphs_of_its_own():
    model = _small_model(0, "cpu")
    model.set_graphed_training(max_signatures=3)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        graphs = _graphs(clone)
        assert graphs.module is clone and graphs.max_signatures == 3
        assert graphs.forward.__self__ is clone  # the copy's own forward, not the original's
        assert graphs.signatures == 0
    model.set_graphed_training(False)
    assert _graphs(model) is None


def test_graphed_training_and_gradient_checkpointing_exclude_each_other():
    model = _small_model(0, "cpu")
    model.set_grad_checkpointing()
    with pytest.raises(ValueError, match="set_grad_checkpointing\\(False\\)"):
        model.set_graphed_training()
    model.set_grad_checkpointing(False)
    model.set_graphed_training()
    with pytest.raises(ValueError, match="set_graphed_training\\(False\\)"):
        model.set_grad_checkpointing()


@pytest.mark.parametrize("kwargs,message", [({"max_signatures": 0}, "max_signatures"), ({"warmup": 0}, "warmup")])
def test_graphed_training_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GraphedTraining(torch.nn.Linear(2, 2), **kwargs)


# --- replays against eager steps: CUDA graphs on the GPU, emulated graphs on the CPU -------------
# (the graph_device fixture, tests/conftest.py)

def _close(device: str, **gpu_tolerance):
    """Tolerances of a replay against eager: exact on the CPU, atomic-order noise on the GPU."""
    return dict(rtol=0, atol=0) if device == "cpu" else gpu_tolerance


def _assert_same_training(device: str, eager: torch.nn.Module, graphed: torch.nn.Module,
                          max_step_change: float) -> None:
    if device == "cpu":
        assert_trained_identically(eager.named_parameters(), graphed.parameters())
    else:
        assert_trained_alike(eager.named_parameters(), graphed.parameters(), max_step_change=max_step_change)


def _train(model, batches, amp_dtype):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler(batches[0][0].device.type, enabled=amp_dtype == torch.float16)
    return [amp_step(model, optimizer, scaler, images, targets, amp_dtype).item() for images, targets in batches]


def _batches(count: int, device: str, shape=(2, 3, 64, 96)):
    generator = torch.Generator(device=device).manual_seed(1)
    return [(torch.randn(shape, device=device, generator=generator),
             torch.randint(0, 10, (shape[0],), device=device, generator=generator)) for _ in range(count)]


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16, torch.float16])
def test_graphed_training_follows_the_eager_steps(graph_device, amp_dtype):
    """Six steps (odd, non-square stage sizes down to 2 × 3) give the eager losses and weights."""
    eager_model = _small_model(0, graph_device)
    graphed_model = copy.deepcopy(eager_model)
    graphed_model.set_graphed_training()
    batches = _batches(6, graph_device)
    eager_losses = _train(eager_model, batches, amp_dtype)
    graphed_losses = _train(graphed_model, batches, amp_dtype)
    graphs = _graphs(graphed_model)
    assert graphs.signatures == 1
    if graph_device == "cpu":  # recorded once, replayed at every step
        (recorded,) = graphs._graphs.values()
        assert recorded.forward_graph.replays == recorded.backward_graph.replays == 6
    tol = 0 if graph_device == "cpu" else 1e-4 if amp_dtype is None else 2e-3
    assert graphed_losses == pytest.approx(eager_losses, rel=tol, abs=0)
    assert len(set(graphed_losses)) == 6, graphed_losses
    _assert_same_training(graph_device, eager_model, graphed_model, max_step_change=6e-3)


def test_replayed_outputs_are_not_overwritten_by_the_next_step(graph_device):
    model = _small_model(0, graph_device)
    model.set_graphed_training()
    (first, _), (second, _) = _batches(2, graph_device)
    kept = []
    for images in (first, first, second):
        logits = model(images)
        logits.sum().backward()
        kept.append((logits, logits.detach().clone()))
    assert _graphs(model).signatures == 1
    for logits, copy_at_the_time in kept:
        torch.testing.assert_close(logits.detach(), copy_at_the_time, rtol=0, atol=0)
    assert not torch.equal(kept[1][1], kept[2][1])


def test_two_forwards_before_one_backward_give_the_eager_gradients(graph_device):
    """The second forward must not overwrite the activations the first one's backward reads."""
    eager_model = _small_model(0, graph_device)
    graphed_model = copy.deepcopy(eager_model)
    graphed_model.set_graphed_training()
    (a, _), (b, _) = _batches(2, graph_device)
    graphed_model(a).sum().backward()  # records the graphs
    graphed_model.zero_grad(set_to_none=True)
    with pytest.warns(UserWarning, match="second forward before the backward"):
        graphed_loss = (graphed_model(a) * graphed_model(b)).sum()
    graphed_loss.backward()
    eager_loss = (eager_model(a) * eager_model(b)).sum()
    eager_loss.backward()
    torch.testing.assert_close(graphed_loss, eager_loss, **_close(graph_device, rtol=1e-5, atol=1e-5))
    for (name, p), q in zip(eager_model.named_parameters(), graphed_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, **_close(graph_device, rtol=1e-4, atol=1e-5), msg=name)


def test_accumulated_gradients_and_zeroing_in_place_match_eager(graph_device):
    """Two backwards into the same .grad (gradient accumulation), then zero_grad(set_to_none=False):
    a gradient that is still the backward graph's own tensor must not be overwritten by the replay."""
    eager_model = _small_model(0, graph_device)
    graphed_model = copy.deepcopy(eager_model)
    graphed_model.set_graphed_training()
    batches = _batches(6, graph_device)
    for model in (eager_model, graphed_model):
        grads = []
        for step in range(3):
            (a, _), (b, _) = batches[2 * step:2 * step + 2]
            model(a).square().mean().backward()
            model(b).square().mean().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            model.zero_grad(set_to_none=False)
        model.accumulated = grads
    for eager_step, graphed_step in zip(eager_model.accumulated, graphed_model.accumulated):
        for (name, _), want, got in zip(eager_model.named_parameters(), eager_step, graphed_step):
            torch.testing.assert_close(got, want, **_close(graph_device, rtol=1e-4, atol=1e-6), msg=name)
    assert _graphs(graphed_model).signatures == 1


def test_gradients_of_a_leaf_input_accumulate_as_in_eager_mode(graph_device):
    """An input that needs a gradient (a leaf, as an attack or saliency loop makes it) accumulates
    its gradients over two steps: the replay hands over a copy, which the next forward replay (its
    memory pool shared with the backward's) leaves alone."""
    eager_model = _small_model(0, graph_device)
    graphed_model = copy.deepcopy(eager_model)
    graphed_model.set_graphed_training()
    (a, _), (b, _) = _batches(2, graph_device)
    grads = []
    for model in (eager_model, graphed_model):
        images = a.clone().requires_grad_()
        model(images).square().mean().backward()
        model(b).square().mean().backward()  # a replay between the two backwards into images.grad
        model(images).sum().backward()  # another gradient (the same one would hide a lost first)
        grads.append(images.grad)
    torch.testing.assert_close(grads[1], grads[0], **_close(graph_device, rtol=1e-4, atol=1e-6))
    assert _graphs(graphed_model).signatures == 2  # with and without a differentiable input


def test_recordings_leave_the_parameters_gradient_hooks_and_accumulators_alone(graph_device):
    """The warm-up and the recorded backward take their gradients at stand-in leaves: a parameter's
    gradient hook fires once per step, as in eager mode, and its gradient accumulator (which DDP
    keeps, bound to the stream it was made on; reaching it from a recording fails on the GPU) takes
    no part in a recording."""
    model = _small_model(0, graph_device)
    model.set_graphed_training()
    calls = collections.Counter()
    for name, p in model.named_parameters():
        p.register_hook(lambda grad, name=name: calls.update([name]))
    for images, _ in _batches(3, graph_device):
        model(images).sum().backward()
    assert _graphs(model).signatures == 1
    assert set(calls) == {name for name, _ in model.named_parameters()}
    assert set(calls.values()) == {3}, calls
    assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())  # the parameters are back


def test_warm_up_and_recorded_backward_run_on_the_calling_thread(graph_device, monkeypatch):
    """The warm-up and recorded backward run on the recording's thread, as the loops run theirs
    (autograd's device thread has no CUDA context of its own: cuBLAS warns there)."""
    import defmamba.graphed_training as graphed_training

    threaded = []
    grad = torch.autograd.grad

    def recording_grad(*args, **kwargs):
        threaded.append(torch.autograd.is_multithreading_enabled())
        return grad(*args, **kwargs)

    monkeypatch.setattr(graphed_training.torch.autograd, "grad", recording_grad)
    model = _small_model(0, graph_device)
    model.set_graphed_training()
    model(_batches(1, graph_device)[0][0]).sum().backward()
    assert _graphs(model).signatures == 1
    assert threaded and not any(threaded), threaded


def test_a_failed_recording_names_the_way_out(monkeypatch):
    """A forward that synchronises with the host cannot be recorded (emulated graphs on the CPU; on
    a GPU the failure would spoil the test process's CUDA random numbers): the error says to turn
    graphed training off and to start a new process."""
    from defmamba.cuda_graphs import CudaGraphError
    from graph_emulation import emulate_cuda_graphs

    emulate_cuda_graphs(monkeypatch)
    layer = torch.nn.Linear(4, 3)
    graphs = GraphedTraining(layer, lambda x: layer(x) * float(x.sum()))
    with pytest.raises(CudaGraphError, match=r"set_graphed_training\(False\).*in a new process"):
        graphs(torch.randn(2, 4))


def test_shapes_beyond_max_signatures_and_evaluation_run_eagerly(graph_device):
    eager_model = _small_model(0, graph_device)
    graphed_model = copy.deepcopy(eager_model)
    graphed_model.set_graphed_training(max_signatures=1)
    (a, _), = _batches(1, graph_device)
    (b, _), = _batches(1, graph_device, shape=(3, 3, 96, 64))
    graphed_model(a).sum().backward()
    with pytest.warns(UserWarning, match="max_signatures=1"):
        out = graphed_model(b)
    torch.testing.assert_close(out, eager_model(b), rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            torch.testing.assert_close(graphed_model(b), eager_model(b), rtol=1e-5, atol=1e-5)
    assert _graphs(graphed_model).signatures == 1


def test_hooks_and_moved_parameters_are_honoured(graph_device):
    model = _small_model(0, graph_device)
    model.set_graphed_training()
    (a, _), = _batches(1, graph_device)
    model(a).sum().backward()
    seen = []
    handle = model.layers[1].register_forward_hook(lambda *_: seen.append(1))
    with pytest.warns(UserWarning, match="has hooks"):
        model(a).sum().backward()
    assert seen == [1]
    handle.remove()
    model.half().float()  # new parameter storage: graphs recorded on the old one must not be replayed
    model(a).sum().backward()
    assert _graphs(model).signatures == 2


def test_backbone_with_a_frozen_stage_follows_eager(graph_device):
    """Four stage outputs, a frozen stem and first stage (eval mode, no gradients): the replayed
    backward gives the eager gradients, and none to the frozen parameters."""
    torch.manual_seed(0)
    eager = defmamba.DefMambaBackbone(dims=32, depths=(1, 1, 1, 1), drop_path_rate=0.0).to(graph_device).train()
    graphed = copy.deepcopy(eager)
    for model in (eager, graphed):
        for module in (model.patch_embed, model.layers[0]):
            module.eval()
            module.requires_grad_(False)
    graphed.set_graphed_training()
    (a, _), (b, _) = _batches(2, graph_device)
    for model in (eager, graphed):
        for images in (a, b):
            model.zero_grad(set_to_none=True)
            outputs = model(images)
            sum((o * (i + 1)).mean() for i, o in enumerate(outputs)).backward()
        model.outputs = [o.detach() for o in outputs]
    assert _graphs(graphed).signatures == 1
    for got, want in zip(graphed.outputs, eager.outputs):
        torch.testing.assert_close(got, want, **_close(graph_device, rtol=1e-5, atol=1e-6))
    for (name, p), q in zip(eager.named_parameters(), graphed.parameters()):
        assert (p.grad is None) == (q.grad is None) == name.startswith(("patch_embed.", "layers.0.")), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, **_close(graph_device, rtol=1e-3, atol=1e-5), msg=name)


def test_graphed_training_under_ddp_follows_eager_ddp(graph_device):
    """DDP's gradient hooks fire as the replayed backward hands the gradients over (one process;
    NCCL on the GPU, gloo on the CPU)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if graph_device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    try:
        eager_model = _small_model(0, graph_device)
        graphed_model = copy.deepcopy(eager_model)
        graphed_model.set_graphed_training()
        batches = _batches(4, graph_device)
        eager_losses = _train(DistributedDataParallel(eager_model), batches, torch.float16)
        graphed_losses = _train(DistributedDataParallel(graphed_model), batches, torch.float16)
    finally:
        dist.destroy_process_group()
    assert _graphs(graphed_model).signatures == 1
    assert graphed_losses == pytest.approx(eager_losses, rel=0 if graph_device == "cpu" else 2e-3, abs=0)
    _assert_same_training(graph_device, eager_model, graphed_model, max_step_change=4e-3)
