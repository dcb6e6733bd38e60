"""Triton kernels launched through their compiled handle, without Triton's per-call binding.

``kernel[grid](*args)`` on a ``@triton.jit`` function binds and specialises every argument, builds
a cache key and looks up the compiled kernel on every call: 15–17 µs of host time per launch of a
13-argument kernel, against 8–9 µs for the compiled kernel's own launcher and 12 µs through this
module (``tools/host_costs.py``, two H100 hosts, Triton 3.6), and an eager DefMamba-T training step
launches Triton kernels about 290 times (docs/benchmarks.md, "Host cost"). :func:`fast_launch`
wraps a kernel so that the same call finds the compiled kernel under a key of its own and calls
its launcher directly, on the current stream of the current device, as Triton does (so CUDA-graph
capture records it the same way).

The key is finer than Triton's specialisation, so a compiled kernel is never launched on
arguments Triton would have compiled differently:

- the current device, how many arguments come by position, and every keyword argument
  (constexprs and launch options such as ``num_warps``) by value;
- each tensor's dtype and whether its address is a multiple of 16 bytes (Triton's alignment);
- each int, bool, float and None by type and exact value (Triton specialises ints on divisibility
  by 16, on the value 1 and on their width, and passes floats as fp32).

A call with a new key goes through Triton's own launch, which compiles or finds the kernel and
returns it; the key then maps to it. Triton's own launch is also taken for every call when an
argument is of any other type, a runtime argument comes by keyword, the grid is not a tuple (a
function of the launch's metadata), Triton's launch hooks are set (a profiler such as Proton),
the compiled kernel lacks the launcher this module calls, under the interpreter, with a Triton
release outside :data:`TRITON_VERSIONS`, or with ``DEFMAMBA_TRITON_FAST_LAUNCH=0`` in the
environment when the library is imported.
"""
from __future__ import annotations

import functools
import inspect
import os
from typing import Any, Callable, Optional

import torch

from .triton_support import interpreting, triton

__all__ = ["FastLaunchKernel", "fast_launch"]

ENABLED = os.environ.get("DEFMAMBA_TRITON_FAST_LAUNCH", "1") != "0"
# The Triton releases whose compiled-kernel launcher this module calls as Triton's own launch does
# (its arguments, the hook chains, the driver's current device and stream): 3.6 checked on a GPU.
TRITON_VERSIONS = ((3, 6), (3, 8))
MAX_KEYS = 4096  # compiled-kernel entries per kernel; the table starts over when full (new shapes keep coming)

# Called as check(kernel, grid, args, kwargs, compiled) before every launch through the compiled
# handle, when set: the GPU tests compare ``compiled`` with what Triton itself would launch.
check: Optional[Callable[..., None]] = None


class FastLaunchKernel:
    """A ``@triton.jit`` kernel whose ``kernel[grid](*args, **constexprs_and_options)`` launches
    through the compiled kernel's handle once Triton has compiled it for that key (module docstring)."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        parameters = list(inspect.signature(kernel.fn).parameters.values())
        self._names = tuple(p.name for p in parameters)
        self._defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
        self._constexpr_names = frozenset(self._names[i] for i in kernel.constexprs)
        self._entries: dict[tuple, tuple] = {}
        self._usable = True

    def __repr__(self) -> str:
        return f"fast_launch({self.kernel!r})"

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        return functools.partial(self._launch, grid)

    def _launch(self, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
        driver = _driver if _driver is not None else _bind_driver()
        if not (self._usable and driver and grid.__class__ is tuple and _hooks_idle()):
            self.kernel[grid](*args, **kwargs)
            return
        device = driver[0]()
        key = self._key(device, args, kwargs)
        try:
            entry = self._entries.get(key)
        except TypeError:  # an unhashable argument
            key = entry = None
        if entry is None:
            compiled = self.kernel[grid](*args, **kwargs)
            if key is not None:
                self._remember(key, compiled, args, kwargs)
            return
        run, function, packed_metadata, tail, compiled = entry
        if check is not None:
            check(self.kernel, grid, args, kwargs, compiled)
        size = len(grid)
        run(grid[0], grid[1] if size > 1 else 1, grid[2] if size > 2 else 1, driver[1](device), function,
            packed_metadata, None, None, None, *args, *tail)

    @staticmethod
    def _key(device: int, args: tuple, kwargs: dict) -> tuple:
        """The cache key of one call (module docstring). An int stands for itself; every other
        scalar is tagged with its type (True, 1 and 1.0 are equal in Python, not to Triton)."""
        return (device, len(args), *kwargs.items(),
                *[(arg.dtype, arg.data_ptr() & 15 == 0) if isinstance(arg, torch.Tensor)
                  else arg if arg.__class__ is int else (arg.__class__, arg) for arg in args])

    def _remember(self, key: tuple, compiled: Any, args: tuple, kwargs: dict) -> None:
        """Map ``key`` to the kernel Triton compiled for it, with the trailing arguments (constexprs
        by keyword and defaults, in parameter order) every launch of that key passes."""
        if any(name in self._names and name not in self._constexpr_names for name in kwargs):
            self._usable = False  # a runtime argument by keyword would be frozen into the key's tail
            return
        if not all(arg is None or isinstance(arg, (torch.Tensor, int, float)) for arg in args):
            return  # keyed by type and value, but Triton may specialise such an argument on more
        try:
            run, function, packed_metadata = compiled.run, compiled.function, compiled.packed_metadata
        except AttributeError:
            self._usable = False  # a Triton whose compiled kernels launch differently
            return
        # (Triton has bound the call already: every later parameter came by keyword or has a default)
        tail = tuple(kwargs[name] if name in kwargs else self._defaults[name] for name in self._names[len(args):])
        if len(self._entries) >= MAX_KEYS:
            self._entries.clear()
        self._entries[key] = (run, function, packed_metadata, tail, compiled)


def fast_launch(kernel: Any) -> Any:
    """Decorator over ``@triton.jit``: the kernel as a :class:`FastLaunchKernel`; unchanged (Triton's
    own launch) when disabled, under the interpreter, without Triton or with a Triton outside
    :data:`TRITON_VERSIONS`."""
    if not ENABLED or triton is None or interpreting() or not _known_triton(triton.__version__):
        return kernel
    if not isinstance(kernel, triton.runtime.jit.JITFunction) or getattr(kernel, "constexprs", None) is None:
        return kernel
    return FastLaunchKernel(kernel)


def _known_triton(version: str) -> bool:
    try:
        major_minor = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return False
    return TRITON_VERSIONS[0] <= major_minor <= TRITON_VERSIONS[1]


def _hooks_idle() -> bool:
    """True when no launch hook is set: Triton then passes hooks that do nothing (or None)."""
    runtime = triton.knobs.runtime
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


# Triton's (current device, current raw stream) functions; () where Triton has no active GPU driver
_driver: Optional[tuple] = None


def _bind_driver() -> tuple:
    """Look up Triton's own current-device and current-stream functions, once."""
    global _driver
    try:
        active = triton.runtime.driver.active
        _driver = (active.get_current_device, active.get_current_stream)
    except Exception:  # noqa: BLE001  (no GPU driver: every launch takes Triton's own path, which reports it)
        _driver = ()
    return _driver
