"""Token permutations and the merge of the three scan orders: forward and gradients equal the
plain torch formulation (gather, whose backward scatters) in float64, on odd lengths."""
from __future__ import annotations

import pytest
import torch

from defmamba.ops.permute import gather_tokens, invert_permutation
from defmamba.ops.scan_orders import merge_scan_orders


def _permutations(batch: int, length: int, g: torch.Generator) -> torch.Tensor:
    return torch.stack([torch.randperm(length, generator=g) for _ in range(batch)])


def test_invert_permutation():
    g = torch.Generator().manual_seed(0)
    order = _permutations(3, 11, g)
    inverse = invert_permutation(order)
    assert torch.equal(torch.gather(inverse, 1, order), torch.arange(11).expand(3, -1))
    assert torch.equal(torch.gather(order, 1, inverse), torch.arange(11).expand(3, -1))


@pytest.mark.parametrize("shape", [(2, 5, 1), (3, 7, 13), (1, 4, 197)])
def test_merge_scan_orders_matches_plain_formulation(shape):
    batch, channels, length = shape
    g = torch.Generator().manual_seed(sum(shape))
    ys = torch.randn(batch, 3, channels, length, dtype=torch.float64, generator=g, requires_grad=True)
    order = _permutations(batch, length, g)
    inverse = invert_permutation(order)

    index = inverse[:, None, :].expand(-1, channels, -1)
    expected = (ys[:, 0] + ys[:, 1].flip(-1) + torch.gather(ys[:, 2], 2, index)) / 3
    got = merge_scan_orders(ys, order, inverse)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    weight = torch.randn(batch, channels, length, dtype=torch.float64, generator=g)
    (expected_grad,) = torch.autograd.grad((expected * weight).sum(), ys)
    (got_grad,) = torch.autograd.grad((got * weight).sum(), ys)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-15, atol=1e-15)
    torch.autograd.gradcheck(lambda t: merge_scan_orders(t, order, inverse), (ys,))
    with torch.no_grad():
        assert torch.equal(merge_scan_orders(ys, order, inverse), got.detach())


def test_gather_tokens_is_torch_gather():
    x = torch.randn(2, 3, 6)
    index = torch.stack([torch.randperm(6), torch.randperm(6)])
    assert torch.equal(gather_tokens(x, index), torch.gather(x, 2, index[:, None, :].expand(-1, 3, -1)))


def test_merge_scan_orders_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\(batch, 3, channels, L\)"):
        merge_scan_orders(torch.zeros(2, 2, 4, 5), torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long))
