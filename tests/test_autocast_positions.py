"""Positions of the deformable order under autocast: reference points, offset scaling and path
positions are float32 whatever the activation dtype, so that neither fp16's range (65,504) nor
its resolution (or bfloat16's) limits the map size or ties neighbouring path positions."""
import pytest
import torch

from defmamba import DefMambaBackbone
from defmamba.models.deformable import DeformableLayer, DeformableOutput, reference_points


def _run_with_offsets(layer: DeformableLayer, x: torch.Tensor, autocast_dtype: torch.dtype | None,
                      replace_offsets: torch.Tensor | None = None) -> tuple[DeformableOutput, torch.Tensor]:
    """The layer's output and the offsets its offset network produced (or was made to produce:
    ``replace_offsets`` stands in for the offset network's output)."""
    seen = {}

    def hook(module, inputs, output):
        seen["offsets"] = output if replace_offsets is None else replace_offsets
        return seen["offsets"]

    handle = layer.conv_offset.register_forward_hook(hook)
    try:
        with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            out = layer(x)
    finally:
        handle.remove()
    return out, seen["offsets"]


def _positions_in_float64(offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample points (B, h, w, 2) and path positions (B, L) of the spec's formulas in float64."""
    batch, _, h, w = offsets.shape
    bounded = torch.tanh(offsets.double())

    def reference(size: int) -> torch.Tensor:
        return (torch.arange(size, dtype=torch.float64, device=offsets.device) + 0.5) / (size - 1) * 2 - 1

    pos_x = reference(w)[None, None, :] + bounded[:, 1] / (w - 1)
    pos_y = reference(h)[None, :, None] + bounded[:, 0] / (h - 1)
    path = bounded[:, 2].reshape(batch, h * w) + reference(h * w)
    return torch.stack((pos_x, pos_y), dim=-1), path


def _assert_float32_positions(out: DeformableOutput, offsets: torch.Tensor, float32_out: DeformableOutput) -> None:
    """Positions and order under autocast equal those of a float32 run from the same offsets, and
    are the spec's positions to float32 accuracy (the order sorts the float64 path positions)."""
    assert out.sample_points.dtype == out.path.dtype == torch.float32
    assert torch.equal(out.sample_points, float32_out.sample_points)
    assert torch.equal(out.path, float32_out.path)
    assert torch.equal(out.order, float32_out.order)
    points, path = _positions_in_float64(offsets)
    # float32 resolution near 2 is 2.4e-7; a bfloat16 (float16) position is off by up to 4e-3 (5e-4).
    torch.testing.assert_close(out.sample_points.double(), points, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.path.double(), path, rtol=0, atol=1e-6)
    # The order sorts the exact path positions, up to float32 rounding.
    assert (path.gather(1, out.order).diff(dim=1) >= -1e-6).all()


def test_reference_points_are_float32_for_half_precision_activations():
    expected = reference_points(13, 40, torch.empty(0))
    assert expected.dtype == torch.float32
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(reference_points(13, 40, torch.empty(0, dtype=dtype)), expected)
    assert reference_points(13, 40, torch.empty(0, dtype=torch.float64)).dtype == torch.float64


def test_positions_and_order_under_bfloat16_autocast_equal_float32():
    """With 24 × 40 = 960 tokens the reference path step 2/959 is below bfloat16's resolution
    near 1 (2^-7): path positions rounded to bfloat16 would tie neighbouring tokens."""
    torch.manual_seed(4)
    layer = DeformableLayer(16, 3)
    x = torch.randn(2, 16, 24, 40)
    out, offsets = _run_with_offsets(layer, x.bfloat16(), torch.bfloat16)
    assert offsets.dtype == torch.bfloat16  # the offset network did run in bfloat16
    float32_out, _ = _run_with_offsets(layer, x, None, replace_offsets=offsets.float())
    _assert_float32_positions(out, offsets, float32_out)


def _backbone_under_autocast(device: str, dtype: torch.dtype, height: int, width: int, depths=(1, 1, 1, 1)):
    """Forward + backward of a Small-width backbone under autocast; returns the features, the input
    gradient and, per deformable layer, (output, offsets, float32 output from the same offsets)."""
    torch.manual_seed(0)
    model = DefMambaBackbone(dims=96, depths=depths).to(device).train()
    captured = []

    def hook(module, inputs, output):
        captured.append((module, inputs[0].detach(), output))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, DeformableLayer)]
    offsets = []
    offset_handles = [m.conv_offset.register_forward_hook(lambda mod, i, o: offsets.append(o.detach()))
                      for m in model.modules() if isinstance(m, DeformableLayer)]
    x = torch.randn(1, 3, height, width, device=device, requires_grad=True)
    try:
        with torch.autocast(device, dtype=dtype):
            features = model(x)
            loss = sum(f.float().square().mean() for f in features)
    finally:
        for handle in handles + offset_handles:
            handle.remove()
    loss.backward()
    layers = []
    for (module, layer_input, output), layer_offsets in zip(captured, offsets):
        with torch.no_grad():
            float32_out, _ = _run_with_offsets(module, layer_input.float(), None,
                                               replace_offsets=layer_offsets.float())
        layers.append((output, layer_offsets, float32_out))
    return features, x.grad, model, layers


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("height,width", [(224, 224), (800, 1344), (1344, 800), (1064, 1096)])
def test_backbone_under_autocast_gpu(dtype, height, width):
    """Small widths, one block per stage. 224²: 3,136 stage-1 tokens, beyond float16's exact
    neighbour spacing; 800 × 1344 and 1344 × 800: 67,200, beyond float16's largest finite value;
    1064 × 1096: 72,884 with odd sizes further down (266 × 274 → 133 × 137 → 67 × 69 → 34 × 35).
    Forward and backward are finite, and each deformable layer's positions and order are those
    of float32 positions from the same offsets."""
    features, grad, model, layers = _backbone_under_autocast("cuda", dtype, height, width)
    assert all(torch.isfinite(f).all() for f in features)
    assert torch.isfinite(grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert layers and layers[0][0].path.shape[1] == (height // 4) * (width // 4)
    for output, offsets, float32_out in layers:
        _assert_float32_positions(output, offsets, float32_out)
