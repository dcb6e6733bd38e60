"""Cheap CPU checks of the CUDA selective-scan backend's packaging (no compilation here)."""
import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
KERNEL_DIR = ROOT / "kernels" / "selective_scan"


def test_cuda_backend_imports_and_explains_itself():
    from defmamba.ops.selective_scan import cuda

    ok, why = cuda.is_available()
    assert isinstance(ok, bool)
    if not ok:
        assert why and ("defmamba_scan_cuda" in why or "GPU" in why)
    else:
        assert why == ""


def test_custom_ops_are_registered():
    import defmamba.ops.selective_scan.cuda  # noqa: F401

    assert hasattr(torch.ops.defmamba, "selective_scan_cuda_fwd")
    assert hasattr(torch.ops.defmamba, "selective_scan_cuda_bwd")


def test_explicit_cuda_backend_error_names_the_build_step():
    from defmamba.ops.selective_scan import cuda, resolve_backend

    if cuda.is_available()[0]:
        pytest.skip("the extension is available here")
    with pytest.raises(RuntimeError, match="kernels/selective_scan"):
        resolve_backend("cuda", torch.device("cuda"))


def test_fake_implementation_gives_output_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from defmamba.ops.selective_scan import cuda

    with FakeTensorMode():
        for length, saved in ((33, 1), (64, 1), (65, 2), (3136, 49)):  # a state every 64 steps
            u = torch.empty(2, 6, length, dtype=torch.bfloat16)
            B = torch.empty(2, 3, 16, length, dtype=torch.bfloat16)
            y, states = cuda._forward_fake(u, u, torch.empty(6, 16), B, B, None, None, True, True, True)
            assert y.shape == u.shape and y.dtype == torch.float32
            assert states.shape == (2, 6, saved, 16) and states.dtype == torch.float32


def test_build_config_describes_one_extension():
    spec = importlib.util.spec_from_file_location("build_config", KERNEL_DIR / "build_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.MODULE_NAME == "defmamba_scan_cuda"
    for rel in module.SOURCES:
        assert (KERNEL_DIR / rel).is_file(), rel
    kwargs = module.extension_kwargs(source_root=KERNEL_DIR)
    (ext,) = kwargs["ext_modules"]
    assert ext.name == "defmamba_scan_cuda"
    assert "build_ext" in kwargs["cmdclass"]
