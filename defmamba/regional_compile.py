"""Regional compilation: torch.compile each block's token mixer (the DSSM) instead of the model.

Eager DefMamba is bound by the host (docs/benchmarks.md, "Host cost"): a DSSM's forward and
backward are dozens of small kernels and autograd nodes around the selective scan. Compiled,
each DSSM runs as one autograd node whose elementwise glue Inductor fuses, while the custom ops
(scan, sampling, layer norms) stay the kernels they are in eager mode.

Why the DSSM and not the block or the model:

* the whole model's training graph fails an Inductor assertion on the GPU (tests/test_compile.py);
* a DSSM holds no per-block constant: every block of a stage shares one compiled graph, and the
  model needs one per stage and mode (a whole block would recompile for each drop-path rate);
* compiled in place (``nn.Module.compile``), the state-dict keys stay those of the checkpoints.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .models.dssm import DSSM

__all__ = ["compile_token_mixers", "RECOMPILE_LIMIT"]

# One graph per stage (4) for training and one per stage for no-grad evaluation, each possibly again
# with a dynamic batch size (a last, smaller batch): 16, with room for the Backbone's extra shapes.
RECOMPILE_LIMIT = 32


def compile_token_mixers(model: nn.Module, **compile_kwargs: Any) -> int:
    """Compile, in place, every :class:`~defmamba.models.dssm.DSSM` inside ``model`` with
    ``torch.compile(**compile_kwargs)`` (``fullgraph=True`` unless given) and return how many.

    Call it after copies of the model are made (an EMA copy would share the compiled code of the
    module it was copied from). Raises Dynamo's recompile limit to :data:`RECOMPILE_LIMIT` if it is
    lower: beyond the limit Dynamo silently runs a region uncompiled.
    """
    mixers = [module for module in model.modules() if isinstance(module, DSSM)]
    if not mixers:
        raise ValueError(f"compile_token_mixers: {type(model).__name__} holds no DefMamba token mixer (DSSM)")
    compile_kwargs.setdefault("fullgraph", True)
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    if getattr(torch._dynamo.config, limit) < RECOMPILE_LIMIT:
        setattr(torch._dynamo.config, limit, RECOMPILE_LIMIT)
    for mixer in mixers:
        mixer.compile(**compile_kwargs)
    return len(mixers)
