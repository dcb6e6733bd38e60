"""defmamba.ops.triton_launch: Triton kernels launched through their compiled handle.

On CPU the launch logic runs against a stand-in for a ``@triton.jit`` kernel (its ``[grid]`` call
"compiles" one kernel per specialisation and records launches); the cache key is compared with
Triton's own argument specialisation. On a GPU (``cuda`` tests) a DefMamba-T training step checks
every launch through the handle against the kernel Triton itself would launch, and the results
against launches through Triton's own path.
"""
from __future__ import annotations

import itertools

import pytest
import torch

triton = pytest.importorskip("triton")

from defmamba.ops import triton_launch  # noqa: E402
from defmamba.ops.triton_launch import FastLaunchKernel, fast_launch  # noqa: E402


def _kernel_fn(x_ptr, n, scale, BLOCK, FLAG=True):  # the parameters of a kernel, as Triton reads them
    pass


class _Compiled:
    """Stands for Triton's compiled kernel: its launcher records each launch's arguments."""

    def __init__(self, specialisation):
        self.specialisation = specialisation
        self.function, self.packed_metadata = object(), object()
        self.launches = []

    def run(self, *args):
        self.launches.append(args)


class _StandInKernel:
    """Stands for a ``@triton.jit`` kernel of ``_kernel_fn`` (BLOCK and FLAG constexprs): its
    ``[grid]`` call compiles once per specialisation and launches through Triton's own path."""

    fn = staticmethod(_kernel_fn)
    constexprs = [3, 4]

    def __init__(self):
        self.compiled = {}
        self.own_launches = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            specialisation = (tuple(_specialisation(a) for a in args), tuple(sorted(kwargs.items())))
            compiled = self.compiled.setdefault(specialisation, _Compiled(specialisation))
            self.own_launches.append((grid, args, kwargs))
            return compiled
        return launch


def _specialisation(arg):
    if isinstance(arg, torch.Tensor):
        return (arg.dtype, arg.data_ptr() % 16 == 0)
    if isinstance(arg, bool) or not isinstance(arg, int):
        return type(arg)
    return (arg % 16 == 0, arg == 1)


@pytest.fixture
def stand_in(monkeypatch):
    """A FastLaunchKernel over a stand-in kernel, on device 3 whose current stream is 77."""
    monkeypatch.setattr(triton_launch, "_driver", (lambda: 3, lambda device: 77 if device == 3 else None))
    kernel = _StandInKernel()
    return kernel, FastLaunchKernel(kernel)


def test_a_repeated_call_launches_the_compiled_kernel_with_every_argument_in_parameter_order(stand_in):
    kernel, fast = stand_in
    x = torch.zeros(64)
    fast[(5,)](x, 48, 0.5, BLOCK=128, num_warps=4)  # compiled and launched by Triton's own path
    assert len(kernel.own_launches) == 1
    (compiled,) = kernel.compiled.values()
    fast[(5, 2)](x, 48, 0.5, BLOCK=128, num_warps=4)
    assert len(kernel.own_launches) == 1
    # grid padded to 3, the current stream, the handle and its metadata, no launch metadata or
    # hooks, then every parameter: the runtime ones, BLOCK by keyword and FLAG's default (no num_warps)
    ((g0, g1, g2, stream, function, metadata, launch_metadata, enter, exit_, *rest),) = compiled.launches
    assert (g0, g1, g2, stream) == (5, 2, 1, 77)
    assert function is compiled.function and metadata is compiled.packed_metadata
    assert (launch_metadata, enter, exit_) == (None, None, None)
    assert rest[0] is x and rest[1:] == [48, 0.5, 128, True]


def test_another_tensor_of_the_same_dtype_and_alignment_reuses_the_compiled_kernel(stand_in):
    kernel, fast = stand_in
    for _ in range(3):
        fast[(1,)](torch.zeros(64), 48, 0.5, BLOCK=128)
    assert len(kernel.own_launches) == 1 and len(next(iter(kernel.compiled.values())).launches) == 2


@pytest.mark.parametrize("change", ["misaligned tensor", "dtype", "int", "constexpr", "launch option", "by keyword",
                                    "device"])
def test_any_change_triton_could_specialise_on_goes_through_tritons_own_launch(stand_in, monkeypatch, change):
    kernel, fast = stand_in
    buffer = torch.zeros(64)
    call = dict(args=(buffer[:32], 48, 0.5), kwargs=dict(BLOCK=128, num_warps=4))
    fast[(1,)](*call["args"], **call["kwargs"])
    fast[(1,)](*call["args"], **call["kwargs"])
    assert len(kernel.own_launches) == 1
    if change == "misaligned tensor":
        call["args"] = (buffer[1:33], 48, 0.5)
    elif change == "dtype":
        call["args"] = (buffer[:32].half(), 48, 0.5)
    elif change == "int":
        call["args"] = (buffer[:32], 49, 0.5)
    elif change == "constexpr":
        call["kwargs"] = dict(BLOCK=64, num_warps=4)
    elif change == "launch option":
        call["kwargs"] = dict(BLOCK=128, num_warps=8)
    elif change == "by keyword":
        call["args"], call["kwargs"] = (buffer[:32], 48, 0.5, 128), dict(num_warps=4)
    else:
        monkeypatch.setattr(triton_launch, "_driver", (lambda: 4, lambda device: 78))
    fast[(1,)](*call["args"], **call["kwargs"])
    assert len(kernel.own_launches) == 2


def test_a_runtime_argument_by_keyword_or_an_unknown_type_always_takes_tritons_launch(stand_in):
    kernel, fast = stand_in
    x = torch.zeros(8)
    for _ in range(2):
        fast[(1,)](x, 48, "not a number", BLOCK=8)
    assert len(kernel.own_launches) == 2
    for _ in range(2):
        fast[(1,)](x, 48, scale=0.5, BLOCK=8)  # the tail would freeze scale: the kernel stops using handles
    fast[(1,)](x, 48, 0.5, BLOCK=8)
    fast[(1,)](x, 48, 0.5, BLOCK=8)
    assert len(kernel.own_launches) == 6
    assert all(not compiled.launches for compiled in kernel.compiled.values())


def test_a_grid_function_takes_tritons_launch(stand_in):
    kernel, fast = stand_in
    x = torch.zeros(8)
    for _ in range(2):
        fast[lambda meta: (1,)](x, 48, 0.5, BLOCK=8)
    assert len(kernel.own_launches) == 2 and not fast._entries


def test_set_launch_hooks_take_tritons_launch(stand_in, monkeypatch):
    kernel, fast = stand_in
    x = torch.zeros(8)
    fast[(1,)](x, 48, 0.5, BLOCK=8)
    monkeypatch.setattr(triton_launch, "_hooks_idle", lambda: False)  # a profiler's launch hook is set
    fast[(1,)](x, 48, 0.5, BLOCK=8)
    assert len(kernel.own_launches) == 2


def test_hooks_are_idle_unless_one_is_added():
    runtime = triton.knobs.runtime
    hook = runtime.launch_enter_hook
    if not hasattr(hook, "add"):
        pytest.skip(f"this Triton's launch hooks are not hook chains ({type(hook).__name__})")
    assert triton_launch._hooks_idle()

    def noted(metadata):
        pass

    hook.add(noted)
    try:
        assert not triton_launch._hooks_idle()
    finally:
        hook.remove(noted)


def test_the_check_hook_sees_each_launch_through_a_handle(stand_in, monkeypatch):
    kernel, fast = stand_in
    seen = []
    monkeypatch.setattr(triton_launch, "check", lambda *call: seen.append(call))
    x = torch.zeros(8)
    fast[(2,)](x, 16, 0.5, BLOCK=8)
    fast[(2,)](x, 16, 0.5, BLOCK=8)
    ((seen_kernel, grid, args, kwargs, compiled),) = seen
    assert seen_kernel is kernel and grid == (2,) and args[1:] == (16, 0.5) and kwargs == dict(BLOCK=8)
    assert compiled is next(iter(kernel.compiled.values()))


def test_the_key_is_bounded(stand_in, monkeypatch):
    monkeypatch.setattr(triton_launch, "MAX_KEYS", 4)
    kernel, fast = stand_in
    x = torch.zeros(8)
    for n in range(10):
        fast[(1,)](x, n, 0.5, BLOCK=8)
    assert len(fast._entries) <= 4


def test_the_key_tells_apart_what_tritons_specialisation_tells_apart(stand_in):
    """For every pair of arguments Triton's own specialisation (its native binder) treats
    differently, the keys differ; tensors that only differ in address (same dtype and alignment)
    share a key, so their launches reuse the compiled kernel."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError as err:
        pytest.skip(f"this Triton has no native specialisation to compare with ({err})")
    _, fast = stand_in
    storage = {dtype: torch.zeros(64, dtype=dtype) for dtype in (torch.float32, torch.float16, torch.bfloat16,
                                                                  torch.int64, torch.int32, torch.uint8)}
    arguments = [t[offset:] for t in storage.values() for offset in (0, 1, 2, 4, 8, 16)]
    arguments += [0, 1, 2, 15, 16, 17, 32, -1, -16, 2**31 - 1, 2**31, -2**31, -2**31 - 1, 2**40, 2**63, True, False,
                  0.0, 1.0, 0.5, None]

    def triton_view(arg):
        return native_specialize_impl(BaseBackend, arg, False, True, True)

    def key(arg):
        return fast._key(0, (arg,), {})

    assert all(key(arg) is not None for arg in arguments)
    for a, b in itertools.combinations(arguments, 2):
        if triton_view(a) != triton_view(b):
            assert key(a) != key(b), (a, b, triton_view(a), triton_view(b))
        elif isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            assert key(a) == key(b), (a.dtype, a.data_ptr() % 16, b.data_ptr() % 16)


def test_scalars_equal_in_python_but_not_to_triton_get_different_keys(stand_in):
    _, fast = stand_in
    keys = {fast._key(0, (value,), {}) for value in (1, True, 1.0)}
    assert len(keys) == 3
    assert fast._key(0, (0.5,), {}) != fast._key(0, (0.25,), {})  # by value (a constexpr float is compiled in)


@pytest.mark.parametrize("version, known", [("3.6.0", True), ("3.8.1+git1234", True), ("3.5.1", False),
                                            ("3.9.0", False), ("4.0.0", False), ("unknown", False)])
def test_only_known_triton_releases_launch_through_handles(version, known):
    assert triton_launch._known_triton(version) is known


def test_the_interpreter_and_plain_functions_keep_tritons_own_launch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernel = _StandInKernel()
    assert fast_launch(kernel) is kernel
    monkeypatch.delenv("TRITON_INTERPRET")
    assert fast_launch(kernel) is kernel  # not a JITFunction


# ----------------------------------------------------------------------------- GPU


def _training_step(model, x, target, dtype):
    with torch.autocast("cuda", dtype=dtype):
        loss = torch.nn.functional.cross_entropy(model(x), target)
    loss.backward()
    return loss.detach()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_kernel_of_a_training_step_launches_what_triton_would_and_gives_the_same_results(monkeypatch, dtype):
    """Two DefMamba-T training steps (Triton scan, batch 2, 96×80 images, drop path on): in the
    second, every Triton launch goes through a compiled handle, and each is the very kernel
    Triton's own binder picks for those arguments (``kernel.warmup``). The losses equal those of
    the same steps with every launch through Triton's own path, bit for bit, and the parameter
    gradients up to the float32 atomic-order noise of the sampling and scan backwards."""
    import defmamba  # noqa: F401  (registers the models)
    import timm

    if not triton_launch.ENABLED or not triton_launch._known_triton(triton.__version__):
        pytest.skip(f"kernels launch through Triton's own path here (DEFMAMBA_TRITON_FAST_LAUNCH=0 or Triton "
                    f"{triton.__version__} outside {triton_launch.TRITON_VERSIONS})")
    torch.manual_seed(0)
    model = timm.create_model("defmamba_tiny", drop_path_rate=0.1, scan_backend="triton").cuda()
    x = torch.randn(2, 3, 96, 80, device="cuda")
    target = torch.tensor([1, 7], device="cuda")
    launches, through_handle, mismatches = {}, {}, []
    original = FastLaunchKernel._launch

    def counted(self, grid, *args, **kwargs):
        launches[self.kernel] = launches.get(self.kernel, 0) + 1
        return original(self, grid, *args, **kwargs)

    def compare(kernel, grid, args, kwargs, compiled):
        through_handle[kernel] = through_handle.get(kernel, 0) + 1
        if kernel.warmup(*args, grid=grid, **kwargs) is not compiled:
            mismatches.append(kernel)

    def tritons_own_launch(self, grid, *args, **kwargs):
        self.kernel[grid](*args, **kwargs)

    def results(launch):
        monkeypatch.setattr(FastLaunchKernel, "_launch", launch)
        out = []
        for step in range(2):
            torch.manual_seed(step)  # the same drop-path draws in both runs
            model.zero_grad(set_to_none=True)
            if step == 1:
                launches.clear()
                monkeypatch.setattr(triton_launch, "check", compare)
            out.append(_training_step(model, x, target, dtype))
            monkeypatch.setattr(triton_launch, "check", None)
        torch.cuda.synchronize()
        return out + [p.grad.clone() for p in model.parameters() if p.grad is not None]

    through_jit = results(tritons_own_launch)
    fast = results(counted)
    assert not mismatches, sorted({k.fn.__name__ for k in mismatches})
    assert len(launches) >= 15, sorted(k.fn.__name__ for k in launches)
    missed = {k.fn.__name__: (n, through_handle.get(k, 0)) for k, n in launches.items()
              if through_handle.get(k, 0) != n}
    assert not missed, f"kernels launched through Triton's own path in the second step: {missed}"
    assert len(fast) == len(through_jit)
    for a, b in zip(fast[:2], through_jit[:2]):
        assert torch.equal(a, b)
    for a, b in zip(fast[2:], through_jit[2:]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)

