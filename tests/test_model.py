"""Model architecture contracts: official key names and shapes, parameter counts, any input
size, the 1-pixel limit of the deformable layer, stochastic depth, gradient checkpointing and the
timm API."""
from pathlib import Path

import pytest
import timm
import torch

import defmamba
from defmamba import DefMamba, DefMambaBackbone
from defmamba.models.deformable import DeformableLayer

REFERENCE = Path(__file__).parent / "fixtures"
OFFICIAL_PARAMS = {"defmamba_tiny": 7_547_878, "defmamba_small": 30_201_340, "defmamba_base": 48_595_576}


def small_model(**kwargs) -> DefMamba:
    torch.manual_seed(0)
    return DefMamba(dims=16, depths=(1, 1, 1, 1), num_classes=10, **kwargs)


def read_keys(name: str) -> list[tuple[str, list[int]]]:
    lines = (REFERENCE / f"keys_{name}.txt").read_text().splitlines()
    return [(key, [int(s) for s in shape.strip("[]").split(",") if s.strip()]) for key, shape in (l.split("\t") for l in lines)]


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_official_keys_shapes_and_parameter_count(name):
    model = timm.create_model(name)
    state = model.state_dict()
    expected = read_keys(name.split("_")[1])
    assert list(state) == [k for k, _ in expected]
    assert all(list(state[k].shape) == shape for k, shape in expected)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[name]


def test_backbone_keys_match_official():
    model = DefMambaBackbone(dims=48, depths=(2, 2, 5, 2))
    expected = read_keys("tiny_backbone")
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == expected


@pytest.mark.parametrize("height,width", [(32, 32), (33, 47), (224, 160), (97, 131)])
def test_any_input_size(height, width):
    model = small_model().eval()
    x = torch.randn(2, 3, height, width)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
    backbone = DefMambaBackbone(dims=16, depths=(1, 1, 1, 1)).eval()
    with torch.no_grad():
        features = backbone(x)
    h, w = height, width
    for i, f in enumerate(features):
        h, w = (h + 1) // 2, (w + 1) // 2
        if i == 0:
            h, w = (h + 1) // 2, (w + 1) // 2
        assert f.shape == (2, 16 * 2 ** i, h, w) and torch.isfinite(f).all()


def test_too_small_input_is_a_clear_error():
    with pytest.raises(ValueError, match="needs H and W ≥ 32"):
        small_model()(torch.randn(1, 3, 31, 64))


def test_an_empty_batch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"the image batch is empty \(shape \(0, 3, 32, 32\)\)"):
        small_model()(torch.randn(0, 3, 32, 32))
    with pytest.raises(ValueError, match="the image batch is empty"):
        DefMambaBackbone(dims=16, depths=(1, 1, 1, 1))(torch.randn(0, 3, 64, 64))


@pytest.mark.parametrize("h,w", [(1, 7), (5, 1), (1, 1)])
def test_one_pixel_axis_has_no_offset_along_it(h, w):
    """Where the original formulas divide by zero (a 1-pixel axis) the sample points stay on
    the axis: the limit of an offset scaled by 1/(size−1) confined to a single pixel."""
    torch.manual_seed(1)
    layer = DeformableLayer(32, 3)
    x = torch.randn(2, 32, h, w, requires_grad=True)
    out = layer(x)
    assert torch.isfinite(out.sequence).all() and torch.isfinite(out.path).all()
    if h == 1:
        assert torch.all(out.sample_points[..., 1] == 0)
    if w == 1:
        assert torch.all(out.sample_points[..., 0] == 0)
    assert sorted(out.order[0].tolist()) == list(range(h * w))
    out.sequence.sum().backward()
    assert torch.isfinite(x.grad).all()


def _positions_by_the_formulas(offsets: torch.Tensor, like: torch.Tensor):
    """Sample points, bias-table points and path positions written out one axis at a time, as the
    original code computes them, in float32 for half-precision activations (float64 for float64)."""
    from defmamba.models.deformable import _key_coords, _offset_scale, _reference_coords

    batch, _, h, w = offsets.shape
    offsets = offsets.to(torch.float64 if like.dtype == torch.float64 else torch.float32)
    pos_y = _reference_coords(h, like)[None, :, None] + torch.tanh(offsets[:, 0]) * _offset_scale(h)
    pos_x = _reference_coords(w, like)[None, None, :] + torch.tanh(offsets[:, 1]) * _offset_scale(w)
    disp_y = (_key_coords(h, like)[None, :, None] - pos_y) * 0.5
    disp_x = (_key_coords(w, like)[None, None, :] - pos_x) * 0.5
    path = torch.tanh(offsets[:, 2].reshape(batch, h * w)) + _reference_coords(h * w, like)
    return torch.stack((pos_x, pos_y), dim=-1), torch.stack((disp_x, disp_y), dim=-1), path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("h,w", [(5, 9), (13, 6), (7, 1)])
def test_positions_are_bit_for_bit_the_per_axis_formulas(monkeypatch, dtype, h, w):
    """The layer builds the sample points, bias-table points and path positions in a few launches
    from kept constants; the values must be exactly those of the per-axis formulas."""
    import defmamba.models.deformable as deformable

    torch.manual_seed(3)
    layer = DeformableLayer(32, 3).to(dtype)
    seen = {}
    real = deformable.sample_in_path_order

    def spy(x, grid, table, disp, path):
        seen.update(grid=grid, disp=disp, path=path)
        return real(x, grid, table, disp, path)

    monkeypatch.setattr(deformable, "sample_in_path_order", spy)
    for _ in range(2):  # the second call uses the kept constants
        x = torch.randn(2, 32, h, w, dtype=dtype) * 3
        layer(x)
        grid, disp, path = _positions_by_the_formulas(layer.conv_offset(x), x)
        for name, expected in (("grid", grid), ("disp", disp), ("path", path)):
            assert seen[name].dtype == expected.dtype and seen[name].shape == expected.shape, name
            assert torch.equal(seen[name], expected), name


def test_kept_position_constants_serve_inference_then_training_and_stay_unchanged():
    """Constants first made under inference_mode are ordinary tensors (a later training step can
    use them); a fake-tensor trace keeps none; nothing writes into the kept tensors."""
    import defmamba.models.deformable as deformable
    from torch._subclasses.fake_tensor import FakeTensorMode

    deformable._GRID_CONSTANTS.clear()
    layer = DeformableLayer(32, 3)
    with FakeTensorMode():
        layer_fake_input = torch.randn(2, 32, 11, 7)
        deformable._grid_constants(11, 7, layer_fake_input, (7, 7))
    assert not deformable._GRID_CONSTANTS
    with torch.inference_mode():
        layer(torch.randn(2, 32, 11, 7))
    kept = torch.utils._pytree.tree_leaves(deformable._GRID_CONSTANTS[(11, 7, (7, 7), torch.float32,
                                                                       torch.device("cpu"))])
    assert len(kept) == 10 and all(isinstance(t, torch.Tensor) for t in kept)
    assert not any(t.is_inference() for t in kept)
    snapshot = [t.clone() for t in kept]
    x = torch.randn(2, 32, 11, 7, requires_grad=True)
    out = layer(x)
    (out.sequence.square().sum() + out.path.sum() + out.sample_points.sum()).backward()
    assert torch.isfinite(x.grad).all() and layer.conv_offset.conv2.weight.grad.abs().sum() > 0
    assert all(torch.equal(a, b) for a, b in zip(kept, snapshot))
    for size in range(3, 3 + deformable._GRID_CONSTANTS_KEPT + 5):
        deformable._grid_constants(size, 5, x, (7, 7))
    assert len(deformable._GRID_CONSTANTS) == deformable._GRID_CONSTANTS_KEPT


def test_residual_drop_path_is_timm_drop_path_in_one_sum():
    """x + DropPath(branch) with timm's mask draws; gradients mask · g for the branch, g for x;
    the plain sum in eval mode and at p = 0; the sum in the wider dtype."""
    from timm.layers import drop_path

    from defmamba.models.blocks import ResidualDropPath

    layer = ResidualDropPath(0.4).train()
    x = torch.randn(16, 5, 3, 7, dtype=torch.float64, requires_grad=True)
    branch = torch.randn(16, 5, 3, 7, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(5)
    out = layer(x, branch)
    torch.manual_seed(5)
    expected = x + drop_path(branch, 0.4, training=True)
    torch.testing.assert_close(out, expected, rtol=1e-15, atol=1e-15)  # addcmul may fuse the product
    kept = (expected - x).flatten(1).abs().sum(1) > 0
    assert 0 < kept.sum() < 16  # with this seed some samples are dropped and some kept
    out.backward(torch.ones_like(out))
    assert torch.equal(x.grad, torch.ones_like(x))
    mask = (kept.to(torch.float64) / (1 - 0.4))[:, None, None, None].expand_as(branch)
    torch.testing.assert_close(branch.grad, mask, rtol=1e-15, atol=0)

    mixed = layer(x.detach().float(), branch.detach().bfloat16())
    assert mixed.dtype == torch.float32
    assert torch.equal(layer.eval()(x, branch), x + branch)
    assert torch.equal(ResidualDropPath(0.0).train()(x, branch), x + branch)
    with pytest.raises(ValueError, match=r"drop_prob must be in \[0, 1\)"):
        ResidualDropPath(1.0)


def test_gradient_checkpointing_gives_identical_gradients():
    x = torch.randn(2, 3, 48, 40)

    def gradients(checkpointing: bool):
        model = small_model(drop_path_rate=0.1).train()
        model.set_grad_checkpointing(checkpointing)
        torch.manual_seed(123)  # same drop-path draws in both runs
        model(x).square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.equal(plain[name], checkpointed[name]), name


def test_timm_api():
    model = timm.create_model("defmamba_tiny", num_classes=7, drop_path_rate=0.0, dims=16, depths=(1, 1, 1, 1))
    assert isinstance(model, DefMamba) and model.get_classifier().out_features == 7
    x = torch.randn(2, 3, 64, 64)
    features = model.forward_features(x)
    assert features.shape == (2, 2, 2, 128)
    assert model.forward_head(features, pre_logits=True).shape == (2, 128)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, 128)
    info = [f["num_chs"] for f in model.feature_info]
    assert info == [16, 32, 64, 128]


def test_timm_features_only():
    model = timm.create_model("defmamba_tiny", features_only=True, out_indices=(1, 3), dims=16, depths=(1, 1, 1, 1))
    outs = model(torch.randn(1, 3, 64, 96))
    assert [o.shape for o in outs] == [torch.Size([1, 32, 8, 12]), torch.Size([1, 128, 2, 3])]
    assert model.feature_info.channels() == [32, 128]


def test_timm_pretrained_from_local_file(tmp_path):
    source = timm.create_model("defmamba_tiny", dims=16, depths=(1, 1, 1, 1))
    path = tmp_path / "weights.pth"
    torch.save({"model": source.state_dict(), "epoch": 3}, path)
    model = timm.create_model("defmamba_tiny", pretrained=True, dims=16, depths=(1, 1, 1, 1),
                              pretrained_cfg_overlay=dict(file=str(path)))
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), model.state_dict().values()))
    retargeted = timm.create_model("defmamba_tiny", pretrained=True, num_classes=5, dims=16, depths=(1, 1, 1, 1),
                                   pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(retargeted.patch_embed[0].weight, source.patch_embed[0].weight)
    assert retargeted.get_classifier().out_features == 5


def test_timm_pretrained_without_file_is_a_clear_error(tmp_path):
    with pytest.raises(defmamba.checkpoint.CheckpointError, match="Google Drive.*pretrained_cfg_overlay"):
        timm.create_model("defmamba_small", pretrained=True)
    with pytest.raises(defmamba.checkpoint.CheckpointError, match="not found"):
        timm.create_model("defmamba_small", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "x.pth")))


def test_pretrained_cfg_records_paper_metadata():
    cfg = timm.models.get_pretrained_cfg("defmamba_base.in1k").to_dict()
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
    assert "top1=84.2" in cfg["notes"] and cfg["origin_url"].startswith("https://drive.google.com/")


def test_build_model_and_timm_optimizer_groups_are_the_authors():
    """Like the authors' model, ours lists no ``no_weight_decay()`` names, so timm's optimizer
    factory (which reads them) groups its parameters as the authors' training code does."""
    import json

    from timm.optim import create_optimizer_v2

    reference = json.loads((REFERENCE / "recipe_param_groups.json").read_text())["classification"]["tiny"]
    model = defmamba.build_model("defmamba_tiny")
    assert not hasattr(model, "no_weight_decay")
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["weight_decay"]: sorted(names[id(p)] for p in g["params"]) for g in optimizer.param_groups}
    assert groups == {0.05: reference["decay"], 0.0: reference["no_decay"]}
    with pytest.raises(ValueError, match="unknown model"):
        defmamba.build_model("defmamba_huge")


def test_offset_scale_is_the_float32_rounding_of_the_grid_step():
    """The offset scale is rounded to float32 in Python arithmetic (no tensor ``.item()``, which
    splits compiled graphs); it must equal the float32 tensor the original code multiplies by."""
    from defmamba.models.deformable import _offset_scale

    for size in (1, 2, 3, 7, 14, 28, 56, 97, 224, 1000, 4097, 12345):
        expected = torch.tensor(1.0 / (size - 1) if size > 1 else 0.0, dtype=torch.float32).item()
        assert _offset_scale(size) == expected, size
