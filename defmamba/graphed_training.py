"""A module's training forward and backward replayed from CUDA graphs, inside an eager loop.

:class:`GraphedTraining` records a module's forward and backward once per input signature (shape,
strides, dtype, autocast state, parameters) and replays them afterwards: the module then costs
the host two graph launches per training step instead of a launch (and its Python) per kernel.
Everything around it stays as it is: the loss, DDP's gradient all-reduce (its hooks fire as the
parameters' gradients arrive), the GradScaler and the optimizer. That suits fixed input sizes
(ImageNet crops, UperNet's 512² crops); DefMamba models turn it on with
``model.set_graphed_training()`` (``defmamba/models/defmamba.py``). The backward is recorded outside
autocast, as an eager loop runs ``loss.backward()``.

A call runs the module eagerly, as it always did, whenever a replay could differ from that:

* outside training with gradients (evaluation, ``torch.no_grad()``), on a non-CUDA input, or with
  nothing to differentiate (every parameter frozen);
* while torch.compile, ``torch.jit`` tracing or an ONNX export records the model;
* while a module inside has hooks or is compiled (a replay would skip them), or checkpoints its
  blocks (the recomputation cannot be recorded);
* while the backward of the previous replay with the same signature is still owed (two forwards
  before one backward: the replay would overwrite the activations the first one keeps);
* for a new signature once ``max_signatures`` have been recorded (each keeps its own memory).

Replays compute what the eager module computes, kernel for kernel. The outputs are fresh tensors
(copied out of the graph's memory), so keeping them across steps is safe. A parameter's gradient
is the backward graph's own tensor (no copy); should it still be that tensor when the module is
called again (gradient accumulation, ``zero_grad(set_to_none=False)``), it becomes a copy first:
the next backward replay overwrites that tensor, and so may the next forward replay (the two graphs
share one memory pool, and the backward's gradients can lie where the forward keeps temporaries).
So accumulating works as in eager mode. The gradients of differentiable inputs are handed over as
copies (a leaf input's accumulator may keep them). The warm-up and the recording run the module with
stand-in leaves for its parameters: the parameters' gradient hooks and accumulators (and DDP's,
which live on the default stream) see only the replays' gradients, once per step, as in eager mode.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn as nn

from .cuda_graphs import AFTER_A_FAILED_RECORDING, CudaGraphError, record_graph, side_stream
from .ops.dispatch import runs_as_called

__all__ = ["GraphedTraining"]

Signature = tuple


def _capturable(inputs: tuple) -> bool:
    """CUDA tensors, and no stream capture under way (inside a whole-step graph the module runs as a
    plain forward)."""
    return (all(isinstance(t, torch.Tensor) and t.is_cuda for t in inputs)
            and not torch.cuda.is_current_stream_capturing())


def _gradients(outputs: list[torch.Tensor], inputs: tuple[torch.Tensor, ...],
               grad_outputs: list[torch.Tensor]) -> tuple[Optional[torch.Tensor], ...]:
    """The gradients of ``inputs``, computed as an eager loop's ``loss.backward()`` computes them:
    outside autocast. (The recording runs inside the caller's forward, under its autocast, which a
    backward started there would keep, casting the backward's matmuls to the autocast dtype.) On
    the calling thread, the recording's own, as this repository's loops run every backward: not on
    autograd's device thread, which has no CUDA context until cuBLAS makes one (and warns)."""
    with torch.autocast(outputs[0].device.type, enabled=False), torch.autograd.set_multithreading_enabled(False):
        return torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)


@contextlib.contextmanager
def _parameters_as_new_leaves(module: nn.Module,
                              params: tuple[torch.Tensor, ...]) -> Iterator[tuple[torch.Tensor, ...]]:
    """The module tree with each of ``params`` replaced, for a recording, by a new leaf parameter on
    the same memory; yields those leaves.

    The recorded backward takes its gradients at these leaves, so the parameters' own gradient
    accumulators take no part in the recording. Those accumulators are bound to the stream they were
    made on: DDP makes and keeps them on the default stream, and a recorded backward that reached
    them would make the default stream wait on the recording stream, which CUDA refuses."""
    leaves = {id(p): nn.Parameter(p.detach(), requires_grad=True) for p in params}
    holders = [(m, name, p) for m in module.modules() for name, p in m._parameters.items()
               if p is not None and id(p) in leaves]
    try:
        for m, name, p in holders:
            m._parameters[name] = leaves[id(p)]
        yield tuple(leaves[id(p)] for p in params)
    finally:
        for m, name, p in holders:
            m._parameters[name] = p


class _Graphs:
    """The forward and backward graphs of one input signature, on one memory pool.

    ``static_inputs`` are the tensors the forward graph reads (each call's inputs are copied in),
    ``outputs`` what it writes; ``grad_outputs`` the backward graph's incoming gradients,
    ``input_grads`` and ``param_grads`` what it writes: one gradient (or None) per input and per
    parameter.
    """

    def __init__(self, module: nn.Module, forward: Callable[..., Any], inputs: tuple[torch.Tensor, ...],
                 params: tuple[torch.Tensor, ...], warmup: int) -> None:
        self.params = params
        self.static_inputs = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in inputs)
        with side_stream(inputs[0].device) as stream, _parameters_as_new_leaves(module, params) as leaves:
            differentiable = tuple(t for t in self.static_inputs if t.requires_grad) + leaves
            for _ in range(warmup):  # cuDNN, Triton and the allocator settle outside the graphs
                outputs = [o for o in torch.utils._pytree.tree_leaves(forward(*self.static_inputs)) if o.requires_grad]
                _gradients(outputs, differentiable, [torch.ones_like(o) for o in outputs])
            del outputs
            self.forward_graph, outputs = record_graph(lambda: forward(*self.static_inputs), "thread_local", stream)
            outputs, self.spec = torch.utils._pytree.tree_flatten(outputs)
            self.grad_outputs = [torch.empty_like(o) if o.requires_grad else None for o in outputs]
            needed = [o for o in outputs if o.requires_grad]
            incoming = [g for g in self.grad_outputs if g is not None]
            self.backward_graph, grads = record_graph(lambda: _gradients(needed, differentiable, incoming),
                                                      "thread_local", stream, pool=self.forward_graph.pool())
        # the recorded outputs' memory, without the recording's autograd graph (nothing runs it again)
        self.outputs = [o.detach() for o in outputs]
        grads = list(grads)
        # the recording returned the differentiable inputs' gradients first, then the parameters'
        self.input_grads = [grads.pop(0) if t.requires_grad else None for t in self.static_inputs]
        self.param_grads = grads
        self.owed: Optional[weakref.ref] = None  # the autograd node of the last replay, until its backward
        self.handed_over = False  # whether the last backward's gradients may still be parameters' .grad

    def backward_owed(self) -> bool:
        return self.owed is not None and self.owed() is not None

    def __call__(self, *inputs: torch.Tensor) -> Any:
        outputs = _Replay.apply(self, *inputs, *self.params)
        node = next((o.grad_fn for o in outputs if o.grad_fn is not None), None)
        self.owed = weakref.ref(node) if node is not None else None
        return torch.utils._pytree.tree_unflatten(list(outputs), self.spec)

    def release_gradients(self) -> None:
        """A parameter gradient that is still the backward graph's own tensor (the replay handed it
        over and nothing set it to None since) becomes a copy, which the next replays leave alone
        (gradient accumulation, ``zero_grad(set_to_none=False)``). Run before either graph replays."""
        if not self.handed_over:
            return
        for p, g in zip(self.params, self.param_grads):
            if g is not None and p.grad is not None and p.grad.data_ptr() == g.data_ptr():
                p.grad = p.grad.clone()
        self.handed_over = False


class _Replay(torch.autograd.Function):
    """Forward: the inputs copied into the graph's, the forward graph replayed, its outputs copied
    out (the next replay overwrites them). Backward: the incoming gradients copied in, the backward
    graph replayed, its gradients handed over."""

    @staticmethod
    def forward(ctx, graphs: _Graphs, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for static, t in zip(graphs.static_inputs, tensors):
            if static.data_ptr() != t.data_ptr():
                static.copy_(t)
        graphs.release_gradients()
        graphs.forward_graph.replay()
        ctx.graphs = graphs
        return tuple(o.clone() for o in graphs.outputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        graphs: _Graphs = ctx.graphs
        for static, g in zip(graphs.grad_outputs, grads):
            if static is not None and static.data_ptr() != g.data_ptr():
                static.copy_(g)
        graphs.release_gradients()
        graphs.backward_graph.replay()
        graphs.owed = None
        graphs.handed_over = True
        return (None, *(g.clone() if g is not None else None for g in graphs.input_grads),
                *(g.detach() if g is not None else None for g in graphs.param_grads))


class GraphedTraining:
    """Replays ``forward(*inputs)`` (by default ``module(*inputs)``), with its backward, from CUDA
    graphs recorded per input signature; see the module docstring for when it runs eagerly.

    Args:
        module: the module whose parameters ``forward`` uses.
        forward: what to record; takes and returns tensors (or lists/tuples of them).
        max_signatures: how many input signatures get graphs; later ones run eagerly.
        warmup: eager runs before each recording (cuDNN and Triton settle there).
    """

    def __init__(self, module: nn.Module, forward: Optional[Callable[..., Any]] = None, max_signatures: int = 2,
                 warmup: int = 3) -> None:
        if max_signatures < 1:
            raise ValueError(f"max_signatures must be ≥ 1, got {max_signatures}")
        if warmup < 1:
            raise ValueError(f"warmup must be ≥ 1 (state the graphs rely on is created there), got {warmup}")
        self.module = module
        self.forward = forward or module
        self.max_signatures = max_signatures
        self.warmup = warmup
        self._graphs: dict[Signature, _Graphs] = {}
        self._warned: set[str] = set()

    def __call__(self, *inputs: torch.Tensor) -> Any:
        tree = self._module_tree(inputs)
        if tree is None:
            return self.forward(*inputs)
        modes, params = tree
        signature = self._signature(inputs, modes, params)
        if signature is None:
            return self.forward(*inputs)
        graphs = self._graphs.get(signature)
        if graphs is None:
            if len(self._graphs) >= self.max_signatures:
                self._warn_once("signatures", f"GraphedTraining: {len(self._graphs)} input signatures already have "
                                f"graphs (max_signatures={self.max_signatures}); inputs of shape "
                                f"{[tuple(t.shape) for t in inputs]} run eagerly")
                return self.forward(*inputs)
            graphs = self._graphs[signature] = self._record(inputs, params)
        elif graphs.backward_owed():
            self._warn_once("owed", "GraphedTraining: a second forward before the backward of the first; it runs "
                            "eagerly (a replay would overwrite the activations the first one keeps)")
            return self.forward(*inputs)
        return graphs(*inputs)

    @property
    def signatures(self) -> int:
        """How many input signatures have graphs."""
        return len(self._graphs)

    def _module_tree(self, inputs: tuple) -> Optional[tuple[tuple[bool, ...], tuple[torch.Tensor, ...]]]:
        """Every submodule's ``training`` flag (a frozen stage may be in eval mode) and every
        parameter (each once), in one walk over the modules, when a replay can stand for this call;
        else None (module docstring). The walk is most of what a call costs the host (a few tenths of a
        millisecond for DefMamba-T)."""
        if not (self.module.training and torch.is_grad_enabled()) or not inputs:
            return None
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return None
        if not _capturable(inputs):
            return None
        modes: list[bool] = []
        params: dict[int, torch.Tensor] = {}
        pending = [self.module]
        while pending:
            m = pending.pop()
            if runs_as_called(m) or m.__dict__.get("grad_checkpointing"):
                self._warn_once("hooks", f"GraphedTraining: {type(m).__name__} has hooks, is compiled or checkpoints "
                                "its blocks, which a replay would skip; the module runs eagerly")
                return None
            modes.append(m.training)
            for p in m._parameters.values():
                if p is not None:
                    params.setdefault(id(p), p)
            pending.extend(c for c in m._modules.values() if c is not None)
        return tuple(modes), tuple(params.values())

    def _signature(self, inputs: tuple, modes: tuple[bool, ...], params: tuple[torch.Tensor, ...]) -> Optional[Signature]:
        """What a recording depends on; None when nothing needs a gradient."""
        device_type = inputs[0].device.type
        autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        tensors = tuple((t.shape, t.stride(), t.dtype, t.device, t.requires_grad) for t in inputs)
        param_keys = tuple((p.data_ptr(), p.dtype, p.requires_grad) for p in params)
        if not any(t.requires_grad for t in inputs) and not any(trains for _, _, trains in param_keys):
            return None
        return tensors, autocast, param_keys, modes

    def _record(self, inputs: tuple, params: tuple[torch.Tensor, ...]) -> _Graphs:
        device_type = inputs[0].device.type
        params = tuple(p for p in params if p.requires_grad)
        # Autocast's cache of cast weights would hand the recording casts made before it, which no
        # replay repeats: record under the same autocast without the cache.
        with torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type),
                            enabled=torch.is_autocast_enabled(device_type), cache_enabled=False):
            try:
                return _Graphs(self.module, self.forward, tuple(inputs), params, self.warmup)
            except CudaGraphError as err:
                raise CudaGraphError(f"GraphedTraining could not record {type(self.module).__name__}'s training "
                                     f"forward and backward ({err.__cause__}); turn it off "
                                     "(set_graphed_training(False)) to train eagerly, "
                                     f"{AFTER_A_FAILED_RECORDING}") from err

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def __deepcopy__(self, memo: dict) -> "GraphedTraining":
        # A copy (an EMA model, a replica) records graphs of its own, on its own parameters.
        module = memo.get(id(self.module)) or copy.deepcopy(self.module, memo)
        forward = self.forward
        if getattr(forward, "__self__", None) is self.module:
            forward = getattr(module, forward.__name__)
        elif forward is self.module:
            forward = module
        return GraphedTraining(module, forward, self.max_signatures, self.warmup)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_graphs"] = {}  # graphs cannot be pickled; a loaded model records its own
        return state
