"""CUDA graphs emulated on the CPU, for testing code that records and replays them without a GPU.

A recording runs the code once and keeps every ATen operator it dispatched, with its arguments
and the tensors it returned. A replay runs the same operators again, in order, on the same tensor
objects, and writes each new result into the tensor the recording returned. That is what a CUDA
graph does with its fixed addresses, and it has the same hazards:

* inputs are read from the tensors the recording read, so a caller must copy new inputs into them;
* outputs are the recording's tensors, overwritten by the next replay;
* anything decided in Python during the recording (a shape, a cached value, a branch, a float
  learning rate) is fixed;
* a host synchronisation (``.item()``, a data-dependent shape) fails the recording, as a capture does.

A capture runs no kernel, so a recording must leave no trace either: it runs the operators (the
code being recorded needs their results to go on), and afterwards puts back every tensor from
before the recording that they wrote to (parameters, optimizer and GradScaler state, an EMA).

A graph recorded into the memory pool of an earlier one (``pool=``) may have been given memory that
the earlier graph's temporaries had used and freed: a replay of the earlier graph may overwrite the
later graph's results. The emulation makes that certain: before the earlier graph replays, every
floating-point tensor the later recording made that is still alive is filled with NaN.

It differs in that freed memory is never reused within a recording (a correct program does not
depend on that reuse), in that tensors made during the recording hold its results rather than
garbage until the first replay, and in that random operators draw afresh at every replay from the
CPU generator (a CUDA graph advances its Philox offset instead).

:func:`emulate_cuda_graphs` puts the emulation in place of ``torch.cuda``'s graphs and streams for
one test, and lets the library's graph paths take CPU tensors.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from defmamba.cuda_graphs import HOST_SYNC_OPS

Op = tuple[Any, tuple, dict, Any]


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _Recorder(TorchDispatchMode):
    """Runs and records every operator; keeps the first value of each tensor from before the
    recording that an operator writes to, for :meth:`restore`."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Op] = []
        self.made: set[int] = set()  # storages of the tensors the recording made
        self.made_tensors: list[weakref.ref] = []  # the tensors themselves, while they live
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.saved_ids: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name in HOST_SYNC_OPS:
            raise RuntimeError(f"operation not permitted when stream is capturing ({func}: a host synchronisation)")
        for i, argument in enumerate(func._schema.arguments):
            if argument.alias_info is not None and argument.alias_info.is_write:
                value = args[i] if i < len(args) else kwargs.get(argument.name)
                for t in tree_leaves(value):
                    if isinstance(t, torch.Tensor) and _storage(t) not in self.made and id(t) not in self.saved_ids:
                        self.saved.append((t, t.clone()))
                        self.saved_ids.add(id(t))
        out = func(*args, **kwargs)
        if all(r.alias_info is None for r in func._schema.returns):  # new tensors, not views or inputs
            made = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            self.made.update(_storage(t) for t in made)
            self.made_tensors += [weakref.ref(t) for t in made]
        self.ops.append((func, args, kwargs, out))
        return out

    def restore(self) -> None:
        """Every tensor from before the recording back to its value then (the earliest copy last)."""
        with torch.no_grad():
            for t, value in reversed(self.saved):
                t.copy_(value)
        self.saved.clear()


class EmulatedGraph:
    """Stands for ``torch.cuda.CUDAGraph``: the operators of one recording; :meth:`replay` runs them
    again into the same tensors."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.ops: list[Op] = []
        self.replays = 0
        self.made_later: list[weakref.ref] = []  # tensors of later recordings into this graph's pool

    def replay(self) -> None:
        with torch.no_grad():
            for ref in self.made_later:
                t = ref()
                if t is not None and t.is_floating_point():
                    t.fill_(float("nan"))
        # The recorded operators are those autocast and autograd issued: run them as they are.
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
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
        self.replays += 1

    def pool(self) -> int:
        _POOLS[id(self)] = self
        return id(self)


_POOLS: "weakref.WeakValueDictionary[int, EmulatedGraph]" = weakref.WeakValueDictionary()


class _Capture:
    """Stands for ``torch.cuda.graph``: records the block's operators into the graph."""

    active = 0

    def __init__(self, cuda_graph: EmulatedGraph, pool: Optional[Any] = None, stream: Any = None,
                 capture_error_mode: str = "global") -> None:
        self.graph = cuda_graph
        self.recorder = _Recorder()
        self.pool_owner = _POOLS.get(pool) if pool is not None else None

    def __enter__(self) -> None:
        _Capture.active += 1
        self.recorder.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.recorder.__exit__(*exc)
        _Capture.active -= 1
        self.recorder.restore()
        self.graph.ops = self.recorder.ops
        if self.pool_owner is not None:
            self.pool_owner.made_later += self.recorder.made_tensors


class _Stream:
    """Stands for ``torch.cuda.Stream``: one CPU stream of work, in order."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, other: "_Stream") -> None:
        pass

    def synchronize(self) -> None:
        pass


_MAIN_STREAM = _Stream()


def emulate_cuda_graphs(monkeypatch) -> None:
    """For one test (pytest's ``monkeypatch`` undoes it): ``torch.cuda``'s graphs and streams are the
    emulation above, and the library's graph paths take CPU tensors."""
    from defmamba import cuda_graphs, graphed_training
    from defmamba.train import train_step

    for name, value in (("CUDAGraph", EmulatedGraph), ("graph", _Capture), ("Stream", _Stream),
                        ("stream", lambda stream=None: contextlib.nullcontext()),
                        ("current_stream", lambda device=None: _MAIN_STREAM),
                        ("synchronize", lambda device=None: None),
                        ("is_current_stream_capturing", lambda: _Capture.active > 0)):
        monkeypatch.setattr(torch.cuda, name, value)
    on_cpu = lambda *tensors: all(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tensors)  # noqa: E731
    monkeypatch.setattr(graphed_training, "_capturable", lambda inputs: on_cpu(*inputs) and not _Capture.active)
    monkeypatch.setattr(train_step, "_graph_device", on_cpu)
    monkeypatch.setattr(cuda_graphs, "require_cuda_for_graphs", lambda device: None)
