"""The bias-table resize as two matmuls (ops/table_resize.py) against ``F.interpolate``.

Fresh random tables, odd and non-square sizes, up- and downsizing, a 1-pixel axis; values and
gradients against PyTorch's bilinear interpolation in float64, float32 against that reference.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from defmamba.models.deformable import DeformableLayer
from defmamba.ops.table_resize import bilinear_weights, first_nonzero_columns, resize_channels_last, table_resize

# (channels, table rows, table columns, h, w)
SIZES = [(5, 7, 7, 56, 56), (4, 7, 7, 13, 5), (3, 7, 5, 3, 9), (2, 7, 7, 1, 1), (6, 7, 7, 7, 7), (3, 7, 7, 1, 29),
         (2, 4, 6, 2, 3), (3, 7, 7, 50, 83)]


def _resize(table: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(C, h, w) through the matmul resize."""
    dtype = torch.promote_types(table.dtype, torch.float32)
    weight_y = bilinear_weights(table.shape[1], h, table.device, dtype)
    weight_x = bilinear_weights(table.shape[2], w, table.device, dtype)
    return resize_channels_last(table, weight_y, weight_x).permute(2, 0, 1)


def _interpolate(table: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return F.interpolate(table[None], size=(h, w), mode="bilinear", align_corners=False)[0]


@pytest.mark.parametrize("channels,a,b,h,w", SIZES)
def test_matches_interpolate_in_float64_values_and_gradients(channels, a, b, h, w):
    g = torch.Generator().manual_seed(h * 100 + w)
    table = torch.randn(channels, a, b, generator=g, dtype=torch.float64)
    weight = torch.randn(channels, h, w, generator=g, dtype=torch.float64)
    leaves = [table.clone().requires_grad_() for _ in range(2)]
    ours, ref = _resize(leaves[0], h, w), _interpolate(leaves[1], h, w)
    assert ours.shape == ref.shape == (channels, h, w) and ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-13)
    (ours * weight).sum().backward()
    (ref * weight).sum().backward()
    torch.testing.assert_close(leaves[0].grad, leaves[1].grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("channels,a,b,h,w", SIZES)
def test_float32_is_within_float32_rounding_of_the_float64_reference(channels, a, b, h, w):
    table = torch.randn(channels, a, b, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ours = _resize(table.float(), h, w)
    assert ours.dtype == torch.float32
    # a few float32 roundings of values of order max|table|
    torch.testing.assert_close(ours.double(), _interpolate(table, h, w), rtol=0, atol=4e-7 * table.abs().max().item())


def test_output_is_channels_last_contiguous_and_float32_under_autocast():
    table = torch.randn(8, 7, 7)
    weight_y, weight_x = bilinear_weights(7, 11), bilinear_weights(7, 6)
    plain = resize_channels_last(table, weight_y, weight_x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = resize_channels_last(table, weight_y, weight_x)
    assert plain.shape == (11, 6, 8) and plain.is_contiguous()
    assert under_autocast.dtype == torch.float32 and torch.equal(under_autocast, plain)


def test_weights_are_rows_of_a_partition_of_unity():
    for in_size, out_size in ((7, 56), (7, 3), (7, 1), (1, 5), (6, 6)):
        weights = bilinear_weights(in_size, out_size, dtype=torch.float64)
        assert weights.shape == (out_size, in_size)
        assert torch.all(weights >= 0) and torch.all((weights > 0).sum(1) <= 2)
        torch.testing.assert_close(weights.sum(1), torch.ones(out_size, dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("in_size,out_size", [(7, 56), (7, 13), (7, 3), (7, 1), (7, 7), (4, 2), (6, 3), (5, 9),
                                              (7, 200), (7, 336), (1, 4)])
def test_first_nonzero_columns_and_column_spans_bound_the_weights(in_size, out_size):
    """Each row's nonzero weights lie in its first nonzero column and the next, which the Triton
    resize reads, and each column's in its span of rows, which its gradient's programs sum over
    (ops/deformable_sampling/positions_triton.py)."""
    weights = bilinear_weights(in_size, out_size)
    first = first_nonzero_columns(weights)
    assert first.dtype == torch.int32 and first.shape == (out_size,)
    first = first.long()
    columns = torch.arange(in_size)[None]
    assert weights[torch.arange(out_size), first].ne(0).all()
    assert weights[(columns < first[:, None]) | (columns > first[:, None] + 1)].eq(0).all()
    resize = table_resize((in_size, 3), out_size, 5, dtype=torch.float64)
    assert torch.equal(resize.weight_y, bilinear_weights(in_size, out_size, dtype=torch.float64))
    assert torch.equal(resize.first_y.long(), first) and resize.first_x.shape == (5,)
    # each column's span holds every row that weighs it, and is no wider than the rows with it as
    # their first nonzero column or the next one
    spans = resize.span_y.long()
    assert resize.span_y.dtype == torch.int32 and spans.shape == (in_size, 2) and resize.span_x.shape == (3, 2)
    rows = torch.arange(out_size)
    for column in range(in_size):
        inside = (rows >= spans[column, 0]) & (rows < spans[column, 1])
        assert weights[~inside, column].eq(0).all()
        assert torch.equal(inside, (first == column) | (first == column - 1))


def test_bad_sizes_are_clear_errors():
    with pytest.raises(ValueError, match="sizes must be positive"):
        bilinear_weights(7, 0)
    with pytest.raises(ValueError, match=r"expected \(h, 7\) and \(w, 7\)"):
        resize_channels_last(torch.randn(3, 7, 7), bilinear_weights(5, 4), bilinear_weights(7, 4))


def test_deformable_layer_samples_the_interpolated_table(monkeypatch):
    """The table the layer hands to the sampling op is F.interpolate's resize of its parameter, on
    a non-square map, both on the first call and with the kept weights."""
    import defmamba.models.deformable as deformable

    torch.manual_seed(0)
    layer = DeformableLayer(16, 3).double()
    seen = {}
    real = deformable.sample_in_path_order

    def spy(x, grid, table, disp, path):
        seen["table"] = table
        return real(x, grid, table, disp, path)

    monkeypatch.setattr(deformable, "sample_in_path_order", spy)
    for _ in range(2):
        layer(torch.randn(2, 16, 9, 5, dtype=torch.float64))
        torch.testing.assert_close(seen["table"], _interpolate(layer.rpe_table, 9, 5), rtol=0, atol=1e-13)


@pytest.mark.cuda
@pytest.mark.parametrize("autocast", [False, True])
def test_cuda_float32_matches_the_float64_reference(autocast):
    torch.backends.cuda.matmul.allow_tf32 = False  # the default; stated because the result depends on it
    table = torch.randn(96, 7, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    weight = torch.randn(96, 56, 45, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    leaf = table.float().cuda().requires_grad_()
    with torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
        ours = _resize(leaf, 56, 45)
    assert ours.dtype == torch.float32
    (ours.double() * weight.cuda()).sum().backward()
    reference = table.clone().requires_grad_()
    expected = _interpolate(reference, 56, 45)
    (expected * weight).sum().backward()
    torch.testing.assert_close(ours.double().cpu(), expected, rtol=0, atol=4e-7 * table.abs().max().item())
    torch.testing.assert_close(leaf.grad.double().cpu(), reference.grad, rtol=1e-5,
                               atol=1e-5 * reference.grad.abs().max().item())
