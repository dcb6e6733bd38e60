"""CUDA graphs emulated on the CPU, for testing code that records and replays them without a GPU.

A recording runs the function once and keeps every ATen operator it dispatched, with its
arguments and the tensors it returned. A replay runs the same operators again, in order, on the
same tensor objects, and writes each new result into the tensor the recording returned. That is
what a CUDA graph does with its fixed addresses, and it has the same hazards:

* inputs are read from the tensors the recording read, so a caller must copy new inputs into them;
* outputs are the recording's tensors, overwritten by the next replay;
* anything decided in Python during the recording (a shape, a cached value, a branch) is fixed;
* a host synchronisation (``.item()``, a data-dependent shape) fails the recording, as a capture does.

It differs in that freed memory is never reused within a recording (a correct program does not
depend on that reuse), and in that random operators draw afresh at every replay from the CPU
generator (a CUDA graph advances its Philox offset instead).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Operators that read tensor values on the host, or whose output shape depends on them: a CUDA
# stream capture refuses them.
HOST_SYNCS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_dim", "equal",
              "is_nonzero", "allclose", "repeat_interleave"}

Op = tuple[Any, tuple, dict, Any]


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Op] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name in HOST_SYNCS:
            raise RuntimeError(f"operation not permitted when stream is capturing ({func}: a host synchronisation)")
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


class EmulatedGraph:
    """The operators of one recorded call; :meth:`replay` runs them again into the same tensors."""

    def __init__(self, ops: list[Op]) -> None:
        self.ops = ops
        self.replays = 0

    def replay(self) -> None:
        # The recorded operators are those autocast and autograd issued: run them as they are.
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            self._run()
        self.replays += 1

    def _run(self) -> None:
        for func, args, kwargs, recorded in self.ops:
            fresh = func(*args, **kwargs)
            returns = func._schema.returns
            if len(returns) == 1:  # a tensor, or one list of them
                pairs = [(returns[0], recorded, fresh)]
            else:
                pairs = list(zip(returns, recorded or (), fresh or ()))
            for schema, old, new in pairs:
                if schema.alias_info is not None:  # a view or an in-place/out= result: already in place
                    continue
                for old_t, new_t in zip(tree_leaves(old), tree_leaves(new)):
                    if isinstance(old_t, torch.Tensor) and old_t is not new_t:
                        if old_t.shape != new_t.shape:
                            raise RuntimeError(f"{func}: replayed shape {tuple(new_t.shape)} differs from the "
                                               f"recorded {tuple(old_t.shape)}")
                        old_t.copy_(new_t)

    def pool(self) -> int:
        return id(self)


def record_graph(fn: Callable[[], Any], capture_error_mode: str = "global", stream: Any = None,
                 pool: Optional[Any] = None) -> tuple[EmulatedGraph, Any]:
    """``defmamba.cuda_graphs.record_graph`` on the CPU: the graph and what the recorded call returned."""
    recorder = _Recorder()
    with recorder:
        result = fn()
    return EmulatedGraph(recorder.ops), result


@contextlib.contextmanager
def no_stream(device: torch.device) -> Iterator[None]:
    yield None


def emulate_cuda_graphs(monkeypatch) -> None:
    """``defmamba.graphed_training`` records and replays emulated graphs of CPU tensors (pytest's
    ``monkeypatch`` undoes it after the test)."""
    from defmamba import graphed_training

    monkeypatch.setattr(graphed_training, "record_graph", record_graph)
    monkeypatch.setattr(graphed_training, "_side_stream", no_stream)
    monkeypatch.setattr(graphed_training, "_capturable",
                        lambda inputs: all(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in inputs))
