"""Every Triton kernel specialization that a DefMamba training step launches on the GPU route compiles
for the GPUs the project supports (compute capability 8.0 and 9.0), checked on a CPU-only machine.

The library's GPU routes run on CPU tensors (kernel launches recorded, not run), in a subprocess
without Triton's interpreter; each distinct launch (kernel, argument types, constexpr values,
launch options) is then compiled ahead of time to a cubin for each target, through Triton's own
compiler and ptxas. This catches what the interpreter cannot: code that only fails to compile for
a GPU. It does not run the kernels; their numerics are checked under the interpreter (the ops'
tests) and on the GPU (the ``cuda`` tests)."""
from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

TARGETS = ((80, 32), (90, 32))  # (compute capability, warp size)
PARTS = 2
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion", "maxnreg")
# every kernel of a DefMamba-T training step's GPU route
EXPECTED = {"_ln_fwd_kernel", "_ln_bwd_kernel", "_dwconv_fwd_kernel", "_dwconv_wgrad_kernel", "_ca_fwd_kernel",
            "_positions_fwd_kernel", "_positions_bwd_kernel", "_sampling_fwd_kernel", "_sampling_bwd_kernel",
            "_stack_orders_fwd_kernel", "_stack_orders_bwd_kernel", "_projection_kernel", "_scan_fwd_kernel",
            "_scan_bwd_kernel", "_merge_gate_fwd_kernel", "_merge_gate_bwd_kernel", "_add_dropped_path_kernel",
            "_dropped_path_grad_kernel", "_gelu_grad_kernel", "_scan_fwd_summary_kernel", "_scan_bwd_summary_kernel"}


def test_every_launched_kernel_compiles_for_sm80_and_sm90(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compiled here and now, not found in a cache
    # two processes, each compiling every other launch (the compiler runs on one core)
    workers = [subprocess.Popen([sys.executable, __file__, str(part), str(PARTS)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for part in range(PARTS)]
    kernels, compiled, failures = set(), 0, []
    for worker in workers:
        out, err = worker.communicate(timeout=900)
        assert worker.returncode == 0, err[-4000:]
        report = json.loads(out.strip().splitlines()[-1])
        kernels |= set(report["kernels"])
        compiled += report["compiled"]
        failures += report["failures"]
    assert not failures, "\n\n".join(failures)
    assert EXPECTED <= kernels, sorted(EXPECTED - kernels)
    assert compiled >= 2 * len(EXPECTED)


def _type_of(value) -> str:
    """Triton's signature type of a launch argument."""
    if isinstance(value, torch.Tensor):
        return "*" + {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                      torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
                      torch.uint8: "u8", torch.bool: "i1"}[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def _record_launches() -> dict:
    """The distinct launches of a DefMamba-T training step's GPU route (float16 and bfloat16
    autocast), each as (kernel, signature, constexprs, options), keyed by a readable description."""
    import timm
    from triton.runtime.jit import JITFunction

    import defmamba  # noqa: F401
    from defmamba.ops import dispatch

    triton_scan = importlib.import_module("defmamba.ops.selective_scan.triton")  # imported on GPU machines only

    launches: dict = {}

    def record(kernel: JITFunction, grid):
        def launch(*args, **kwargs):
            options = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
            bound = inspect.signature(kernel.fn).bind(*args, **kwargs)
            bound.apply_defaults()
            signature, constexprs = {}, {}
            for param in kernel.params:
                value = bound.arguments[param.name]
                if param.is_constexpr:
                    signature[param.name] = "constexpr"
                    constexprs[param.name] = value
                else:
                    signature[param.name] = _type_of(value)
            # one launch per code path: the argument types and the constexpr switches (booleans);
            # launches that differ only in block sizes share a key (the first one is compiled)
            switches = sorted((k, v) for k, v in constexprs.items() if isinstance(v, bool))
            key = f"{kernel.fn.__name__} {sorted(signature.items())} {switches}"
            launches.setdefault(key, (kernel, signature, constexprs, options))
        return launch

    def use_kernels(op, *tensors):  # dispatch.use_kernels's rule with CPU tensors standing for CUDA ones
        return (not dispatch.reference_forced(op) and not torch.jit.is_tracing()
                and all(t is None or (t.dtype in dispatch.KERNEL_DTYPES and t.numel()) for t in tensors))

    JITFunction.__getitem__ = record
    rule = dispatch.use_kernels
    for name, module in list(sys.modules.items()):
        if name.startswith("defmamba.ops.") and module is not dispatch:
            if getattr(module, "use_kernels", None) is rule:
                module.use_kernels = use_kernels
            if hasattr(module, "check_launch"):
                module.check_launch = lambda *args: None
    triton_scan.interpreting = lambda: True  # its CUDA-tensor check only
    # an H100's multiprocessors: the first stage's scans (batch 2, 1,024 positions) run chunked, the
    # later ones whole, so both variants of the scan kernels are launched
    triton_scan._multiprocessors = lambda device: 132
    sys.modules["defmamba.ops.selective_scan"].resolve_backend = lambda backend, device: (
        "triton", triton_scan.selective_scan_triton)
    enabled, autocast_dtype = torch.is_autocast_enabled, torch.get_autocast_dtype
    torch.is_autocast_enabled = lambda device_type=None: enabled("cpu" if device_type == "cuda" else device_type) \
        if device_type is not None else enabled()
    torch.get_autocast_dtype = lambda device_type: autocast_dtype("cpu" if device_type == "cuda" else device_type)

    torch.manual_seed(0)
    model = timm.create_model("defmamba_tiny", drop_path_rate=0.2).to(memory_format=torch.channels_last).train()
    x = torch.randn(2, 3, 128, 128).contiguous(memory_format=torch.channels_last)
    for dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cpu", dtype=dtype):
            loss = model(x).float().logsumexp(-1).mean()
        loss.backward()
    return launches


def _compile_part(launches: dict, part: int, parts: int) -> dict:
    """Compile every ``parts``-th launch (in key order) from the ``part``-th, for each target."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failures, compiled, kernels = [], 0, set()
    for key, (kernel, signature, constexprs, options) in sorted(launches.items())[part::parts]:
        kernels.add(kernel.fn.__name__)
        for capability, warp_size in TARGETS:
            try:
                triton.compile(ASTSource(kernel, signature, constexprs=constexprs),
                               target=GPUTarget("cuda", capability, warp_size), options=dict(options))
                compiled += 1
            except Exception as err:  # noqa: BLE001  (any compiler error is the finding)
                failures.append(f"sm_{capability}: {key}\n{type(err).__name__}: {str(err)[-1500:]}")
    return {"kernels": sorted(kernels), "compiled": compiled, "failures": failures}


if __name__ == "__main__":  # the recording and compilation (run by the test above in subprocesses)
    part, parts = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) == 3 else (0, 1)
    print(json.dumps(_compile_part(_record_launches(), part, parts)))
