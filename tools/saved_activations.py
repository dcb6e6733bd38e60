"""Activation memory of one DM block: the bytes autograd keeps for the backward, by submodule.

    python tools/saved_activations.py --model defmamba_small --amp bfloat16 [--stage 1] [--tensors]

Runs training forwards of the first block of each stage (or one stage) on the CPU and counts every
distinct tensor storage that autograd saves for the backward (parameters excepted: they are
resident anyway), attributed to the innermost submodule that was running. Two batch sizes separate the part that grows with the batch (reported
per image) from the part that does not (autocast's weight copies, reported per block). The selective scan is replaced by a stand-in that keeps
exactly what the GPU scan ops keep (their inputs and the float32 states saved every 64 steps), so the numbers
are those of a GPU training step with the cuda scan backend; the peak GPU memory of a training step
is about the sum over all blocks times the batch, plus weights, gradients and optimizer state.
"""
from __future__ import annotations

import argparse
import collections
from typing import Optional

import torch

import defmamba
from defmamba.models import dssm
from defmamba.ops.selective_scan.cuda import STATE_INTERVAL, STATES  # the cuda scan's saved-state interval, padded states


class _ScanThatSavesLikeTheGpuOps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, out_dtype):
        batch, channels, length = u.shape
        states = torch.empty(batch, channels, -(-length // STATE_INTERVAL), STATES)
        ctx.save_for_backward(u, delta, A, B.contiguous(), C.contiguous(), D, delta_bias, states)
        return torch.zeros(u.shape, dtype=out_dtype)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("the stand-in scan only counts saved tensors")


def _stand_in_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, out_dtype=None, backend="auto",
                   A_is_log=False):
    if A_is_log:  # as selective_scan does for the cuda backend
        A = -torch.exp(A.float())
    return _ScanThatSavesLikeTheGpuOps.apply(u.contiguous(), delta.contiguous(), A, B, C, D, delta_bias,
                                            out_dtype or u.dtype)


def saved_bytes(block: torch.nn.Module, x: torch.Tensor, amp: Optional[torch.dtype],
                tensors: bool = False, record: Optional[list] = None) -> collections.Counter:
    """Bytes that autograd saves in one forward of ``block`` on ``x``, by submodule name.
    ``record``, if given, receives (submodule, shape, dtype, storage bytes) of each saved storage."""
    stack = ["(block)"]
    hooks = []
    for name, module in block.named_modules():
        if name:
            hooks.append(module.register_forward_pre_hook(lambda m, a, name=name: stack.append(name)))
            hooks.append(module.register_forward_hook(lambda m, a, o: stack.pop() and None))
    per_module: collections.Counter = collections.Counter()
    seen = {p.untyped_storage().data_ptr() for p in block.parameters()}   # resident anyway: not counted

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen and storage.nbytes():
            seen.add(storage.data_ptr())
            per_module[stack[-1]] += storage.nbytes()
            if record is not None:
                record.append((stack[-1], tuple(t.shape), t.dtype, storage.nbytes()))
            if tensors:
                print(f"    {stack[-1]:28s} {str(tuple(t.shape)):24s} {str(t.dtype):15s} "
                      f"{storage.nbytes() / 2 ** 20:7.2f} MiB")
        return t

    original = dssm.selective_scan
    dssm.selective_scan = _stand_in_scan
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            block(x)
    finally:
        dssm.selective_scan = original
        for hook in hooks:
            hook.remove()
    return per_module


def per_image_and_fixed(block: torch.nn.Module, size: int, dim: int, amp: Optional[torch.dtype],
                        tensors: bool = False) -> tuple[collections.Counter, collections.Counter]:
    """(bytes per image, bytes independent of the batch) saved by ``block``, by submodule: the
    difference of a batch-2 and a batch-1 forward, and what is left of the batch-1 count."""
    one = saved_bytes(block, torch.randn(1, size, size, dim, requires_grad=True), amp, tensors)
    two = saved_bytes(block, torch.randn(2, size, size, dim, requires_grad=True), amp)
    per_image = collections.Counter({k: two[k] - one[k] for k in two if two[k] - one[k] > 0})
    fixed = collections.Counter({k: one[k] - per_image[k] for k in one if one[k] - per_image[k] > 0})
    return per_image, fixed


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="defmamba_small", choices=["defmamba_tiny", "defmamba_small", "defmamba_base"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--amp", choices=["float32", "bfloat16", "float16"], default="bfloat16",
                        help="autocast dtype of the forward (float32: no autocast)")
    parser.add_argument("--stage", type=int, choices=[1, 2, 3, 4], help="only this stage (default: all four)")
    parser.add_argument("--tensors", action="store_true", help="also list every saved tensor")
    args = parser.parse_args(argv)
    amp = None if args.amp == "float32" else getattr(torch, args.amp)
    torch.manual_seed(0)
    model = defmamba.build_model(args.model, scan_backend="torch").train()
    total = 0.0
    for index, layer in enumerate(model.layers):
        if args.stage is not None and index + 1 != args.stage:
            continue
        block = layer.blocks[0]
        size = args.image_size // 4 // 2 ** index
        dim = block.norm.normalized_shape[0]
        per_image, fixed = per_image_and_fixed(block, size, dim, amp, args.tensors)
        block_total = sum(per_image.values())
        total += block_total * len(layer.blocks)
        print(f"stage {index + 1}: {len(layer.blocks)} blocks of {size}x{size}x{dim}, {args.amp}: "
              f"{block_total / 2 ** 20:.2f} MiB/img saved per block (+ {sum(fixed.values()) / 2 ** 20:.2f} MiB "
              "per block independent of the batch)")
        for name, nbytes in per_image.most_common(8):
            print(f"  {name:28s} {nbytes / 2 ** 20:7.2f} MiB/img")
    if args.stage is None:
        print(f"all blocks: {total / 2 ** 20:.1f} MiB/img saved ({total * 128 / 2 ** 30:.2f} GiB at batch 128)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
