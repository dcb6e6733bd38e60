"""The op wrapper every kernel goes through (defmamba.ops.kernel_op): eager calls and the custom op
under torch.compile compute the same gradients, and in eager mode an output without a gradient
costs the backward nothing (no zero tensor is filled for it)."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from defmamba.ops.kernel_op import kernel_op


class _CountZeroFills(TorchDispatchMode):
    """Counts the aten calls that make or fill a tensor of zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("zeros", "zeros_like", "new_zeros", "zero_", "fill_"):
            self.count += 1
        return func(*args, **(kwargs or {}))


_received = []  # the gradient the backward got for the statistics output, per call


def _scale_and_stats(x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return x * scale, x.sum(-1)


def _scale_and_stats_fake(x, scale):
    return torch.empty_like(x), x.new_empty(x.shape[:-1])


def _setup_context(ctx, inputs, output) -> None:
    ctx.scale = inputs[1]
    ctx.mark_non_differentiable(output[1])


def _scaled(grad: torch.Tensor, scale: float) -> torch.Tensor:
    return grad * scale


def _scaled_fake(grad, scale):
    return torch.empty_like(grad)


def _backward(ctx, kernel, grad, grad_stats):
    _received.append(grad_stats)
    return kernel(grad, ctx.scale), None


_op = kernel_op("test_scale_and_stats", _scale_and_stats, _scale_and_stats_fake, setup_context=_setup_context,
                backward=_backward, backward_impl=_scaled, backward_fake=_scaled_fake)


def test_an_output_without_a_gradient_reaches_the_backward_as_none_in_eager_mode():
    _received.clear()
    x = torch.randn(4, 7, requires_grad=True)
    weight = torch.randn(4, 7)
    y, stats = _op(x, 3.0)
    assert not stats.requires_grad
    with _CountZeroFills() as fills:
        (y * weight).sum().backward()
    assert _received == [None]
    assert fills.count == 0
    torch.testing.assert_close(x.grad, 3.0 * weight, rtol=0, atol=0)


def test_compiled_custom_op_gives_the_eager_gradient():
    weight = torch.randn(5, 3)

    def loss(x):
        y, stats = _op(x, -2.0)
        return (y * weight).sum() + stats.detach().sum()

    grads = []
    for fn in (loss, torch.compile(loss, backend="aot_eager", fullgraph=True)):
        x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
        fn(x).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    torch.testing.assert_close(grads[0], -2.0 * weight, rtol=0, atol=0)
