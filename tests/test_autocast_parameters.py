"""A stage's matmul parameters cast for all its blocks at once under autocast
(defmamba/models/autocast_parameters.py): the same outputs and gradients, bit for bit, as
autocast's per-layer casts; far fewer casts; and out of the way where it must be."""
from __future__ import annotations

import collections
import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import defmamba
from defmamba.models import autocast_parameters
from defmamba.models.blocks import DMBlock


@pytest.fixture
def per_layer_casts(monkeypatch):
    """``per_layer_casts(True)`` goes back to autocast's own per-layer casts for the rest of the test."""
    def switch(on: bool) -> None:
        assert on
        monkeypatch.setattr(autocast_parameters, "autocast_dtype_for", lambda *args: None)
    return switch


def _step(model, x, target, dtype=torch.bfloat16):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same drop-path masks in both runs
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out.float(), target)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def _assert_identical(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.stride() == b.stride(), what
    assert torch.equal(a, b), f"{what}: largest difference {(a.double() - b.double()).abs().max().item():.3e}"


@pytest.mark.parametrize("height,width", [(64, 96), (45, 39)])
def test_training_step_is_bitwise_the_per_layer_one(per_layer_casts, height, width):
    torch.manual_seed(0)
    model = defmamba.build_model("defmamba_tiny", dims=16, depths=(1, 2, 1, 1), drop_path_rate=0.3).train()
    model.layers[0].requires_grad_(False)  # a frozen stage: its parameters get no gradient either way
    x = torch.randn(2, 3, height, width)
    target = torch.tensor([3, 999])
    calls = []
    real = autocast_parameters.cast_parameters
    autocast_parameters.cast_parameters = lambda *args: calls.append(1) or real(*args)
    try:
        out, grads = _step(model, x, target)
    finally:
        autocast_parameters.cast_parameters = real
    assert len(calls) == 5, "every stage casts its blocks' parameters once, the model the layers around them once"
    per_layer_casts(True)
    out_ref, grads_ref = _step(model, x, target)
    _assert_identical(out, out_ref, "logits")
    assert grads.keys() == grads_ref.keys()
    assert not any(n.startswith("layers.0.") for n in grads)
    for name in grads_ref:
        _assert_identical(grads[name], grads_ref[name], name)
        assert grads[name].dtype == torch.float32


def test_inference_is_bitwise_the_per_layer_one(per_layer_casts):
    torch.manual_seed(0)
    model = defmamba.build_model("defmamba_tiny", dims=16, depths=(1, 1, 2, 1)).eval()
    x = torch.randn(1, 3, 40, 72)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        per_layer_casts(True)
        out_ref = model(x)
    _assert_identical(out, out_ref, "logits")


def test_it_stands_aside_where_it_must():
    model = defmamba.build_model("defmamba_tiny", dims=16, depths=(1, 1, 1, 1))
    group = model.layers[0]._autocast_group
    params = [module._parameters[leaf] for module, leaf in group.holders]
    assert len(params) == len(DMBlock.AUTOCAST_PARAMETERS)
    assert autocast_parameters.autocast_dtype_for(params, group.ancestors) is None  # no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_parameters.autocast_dtype_for(params, group.ancestors) == torch.bfloat16
        assert autocast_parameters.autocast_dtype_for([p.bfloat16() for p in params], group.ancestors) is None
        model.layers[0].blocks[0].op.compile()  # a compiled module keeps the parameters it was compiled with
        assert autocast_parameters.autocast_dtype_for(params, group.ancestors) is None


def test_group_names_are_checked_and_weights_loaded_later_are_seen():
    model = defmamba.build_model("defmamba_tiny", dims=16, depths=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="no parameter '0.op.in_proj.bias'"):
        autocast_parameters.ParameterCastGroup(model.layers[0].blocks, ["0.op.in_proj.bias"])
    group = autocast_parameters.ParameterCastGroup(model.layers[0].blocks, ["0.op.in_proj.weight"])
    fresh = torch.nn.Parameter(torch.randn_like(model.layers[0].blocks[0].op.in_proj.weight))
    model.layers[0].blocks[0].op.in_proj.weight = fresh
    seen = []
    model.layers[0].blocks.register_forward_pre_hook(lambda m, a: seen.append(m[0].op.in_proj.weight))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        group.run(torch.randn(1, 8, 8, 16))
    assert seen[0].dtype == torch.bfloat16 and torch.equal(seen[0], fresh.detach().bfloat16())
    assert model.layers[0].blocks[0].op.in_proj.weight is fresh  # put back after the run
    # a parameter moved out of its module (as FSDP's flat parameters do): the group stands aside
    del model.layers[0].blocks[0].op.in_proj._parameters["weight"]
    model.layers[0].blocks[0].op.in_proj.weight = fresh.detach().clone()
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        group.run(torch.randn(1, 8, 8, 16))
    assert seen[0].dtype == torch.float32


def test_gradient_checkpointing_keeps_per_layer_casts():
    torch.manual_seed(0)
    model = defmamba.build_model("defmamba_tiny", dims=16, depths=(1, 1, 1, 1), drop_path_rate=0.0).train()
    x, target = torch.randn(2, 3, 32, 48), torch.tensor([0, 1])
    out_ref, grads_ref = _step(model, x, target)
    model.set_grad_checkpointing(True)
    out, grads = _step(model, x, target)  # recomputation must see the forward's own operations
    _assert_identical(out, out_ref, "logits")
    for name in grads_ref:
        _assert_identical(grads[name], grads_ref[name], name)


def test_strides_and_dtypes_are_kept_and_non_dense_tensors_are_cast_alone():
    conv = torch.randn(8, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    strided = torch.randn(6, 10)[:, ::2]
    same = torch.randn(5, dtype=torch.bfloat16)
    out = autocast_parameters._copy_as([conv, strided, same], [torch.bfloat16] * 3)
    assert out[0].stride() == conv.stride() and torch.equal(out[0], conv.bfloat16())
    assert torch.equal(out[1], strided.bfloat16())
    assert out[2] is same


class _ParameterCasts(TorchDispatchMode):
    """Records the parameters cast one at a time (or views of them) and counts the multi-tensor copies."""

    def __init__(self, names: dict[int, str]):
        super().__init__()
        self.names, self.cast, self.multi_tensor_copies = names, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # a view of a parameter counts as the parameter (the offset network's 1×1 conv weight is
        # used as the matrix it is, a view)
        source = args[0]._base if func is torch.ops.aten._to_copy.default and args[0]._base is not None else args[0]
        if func is torch.ops.aten._to_copy.default and id(source) in self.names:
            self.cast.append(self.names[id(source)])
        elif func is torch.ops.aten._foreach_copy_.default:
            self.multi_tensor_copies += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("grad", [False, True])
def test_cuda_autocast_casts_per_stage_not_per_layer(monkeypatch, per_layer_casts, grad):
    """On (fake) CUDA tensors under float16 autocast, the blocks' matmul parameters (and without
    gradients fc1's bias) are cast in one multi-tensor copy per stage; with autocast's per-layer
    casts, each is cast on its own."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from defmamba.ops import dispatch

    model = defmamba.build_model("defmamba_tiny", dims=16, depths=(1, 2, 1, 1)).train(grad)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                with fake:
                    module._parameters[name] = torch.nn.Parameter(fake.from_tensor(p.detach()).to("cuda"))
        for name, b in list(module._buffers.items()):
            if b is not None:
                with fake:
                    module._buffers[name] = fake.from_tensor(b).to("cuda")
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = {f"layers.{i}.blocks.{j}.{name}" for i, stage in enumerate(model.layers) for j in range(len(stage.blocks))
               for name in (DMBlock.AUTOCAST_PARAMETERS if grad else DMBlock.INFERENCE_AUTOCAST_PARAMETERS)}
    assert grad or any(name.endswith("mlp.fc1.bias") for name in grouped)
    # the stem's two convolutions, the three downsamples' and the classifier's linear layer
    around = {f"patch_embed.{i}.{leaf}" for i in (0, 5) for leaf in ("weight", "bias")}
    around |= {f"layers.{i}.downsample.1.{leaf}" for i in range(3) for leaf in ("weight", "bias")}
    around |= {"classifier.head.weight", "classifier.head.bias"}
    assert around <= set(names.values())
    grouped |= around
    scan = importlib.import_module("defmamba.ops.selective_scan")
    monkeypatch.setattr(dispatch, "_kernels_ready", False)  # the PyTorch routes: no Triton on fake tensors
    for backend in ("cuda", "triton"):
        monkeypatch.setitem(scan._loaded, backend, (None, "not on fake tensors"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # autocast("cuda") checks it

    def forward() -> _ParameterCasts:
        counter = _ParameterCasts(names)
        # cuDNN's grid sampler has no shape-only implementation; the native one has
        with torch.backends.cudnn.flags(enabled=False), fake, counter, torch.set_grad_enabled(grad), \
                torch.autocast("cuda", dtype=torch.float16):
            model(torch.randn(1, 3, 64, 64, device="cuda"))
        return counter

    grouped_casts = forward()
    assert grouped_casts.multi_tensor_copies == len(model.layers) + 1
    assert not grouped & set(grouped_casts.cast)
    per_layer_casts(True)
    per_layer = forward()
    assert per_layer.multi_tensor_copies == 0
    assert grouped <= set(per_layer.cast) and len(per_layer.cast) == len(grouped_casts.cast) + len(grouped)


def test_a_copy_of_the_model_casts_its_own_parameters():
    import copy

    torch.manual_seed(0)
    model = defmamba.build_model("defmamba_tiny", dims=16, depths=(1, 1, 1, 1)).eval()
    clone = copy.deepcopy(model)
    assert clone.layers[0]._autocast_group.root is clone.layers[0].blocks
    # what a replica of nn.DataParallel looks like: its own modules, the original's attributes
    replica = copy.deepcopy(model)
    for stage, original in zip(replica.layers, model.layers):
        stage._autocast_group = original._autocast_group
    with torch.no_grad():
        replica.layers[0].blocks[0].op.in_proj.weight.mul_(2)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = replica(x)  # rebuilds its groups: runs its own blocks
        assert replica.layers[0]._autocast_group.root is replica.layers[0].blocks
        assert not torch.equal(expected, model(x))


def test_a_new_head_is_cast_with_the_layers_around_the_stages(per_layer_casts):
    """After reset_classifier the group names the new head, and none after a reset to no head; the
    backbone (no head) groups its stem and downsamples; outputs stay bitwise autocast's own."""
    torch.manual_seed(0)
    model = defmamba.build_model("defmamba_tiny", dims=16, depths=(1, 1, 1, 1)).eval()
    backbone = defmamba.models.DefMambaBackbone(dims=16, depths=(1, 1, 1, 1)).eval()
    x = torch.randn(1, 3, 36, 44)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
        old_head = model.classifier.head
        model.reset_classifier(7)
        logits = model(x)
        holders = [module for module, _ in model._autocast_group.holders]
        assert model.classifier.head in holders and old_head not in holders
        maps = backbone(x)
        assert backbone._autocast_group.names == [n for n in model._autocast_group.names if "classifier" not in n]
        model.reset_classifier(0)
        model(x)
        assert not any("classifier" in n for n in model._autocast_group.names)
        model.reset_classifier(7)
        model.classifier.head.load_state_dict(holders[-1].state_dict())
        per_layer_casts(True)
        _assert_identical(logits, model(x), "logits after reset_classifier")
        for got, want in zip(maps, backbone(x)):
            _assert_identical(got, want, "backbone map")
