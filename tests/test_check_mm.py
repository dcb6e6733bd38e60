"""tools/check_mm.py, the last step of tools/install_mm.sh: a CPU-only mmcv passes when CUDA ops
were not wanted and is refused, loudly, when they were."""
import subprocess
import sys
from pathlib import Path

import pytest
from tool_helpers import load_tool

pytest.importorskip("mmdet", reason="mmdet not installed (optional extra: bash tools/install_mm.sh)")
pytest.importorskip("mmseg", reason="mmsegmentation not installed (optional extra: bash tools/install_mm.sh)")
pytest.importorskip("mmcv.ops", reason="mmcv without compiled ops")

REPO = Path(__file__).resolve().parents[1]
check_mm = load_tool("check_mm")

cpu_only_mmcv = pytest.mark.skipif(check_mm.compiled_cuda_version() is not None,
                                   reason="this environment's mmcv has CUDA ops")


def test_ops_run_on_the_cpu():
    aligned, keep = check_mm.run_ops("cpu")
    assert aligned.shape == (6, 4, 3, 3) and aligned.abs().sum() > 0
    assert 0 < len(keep) <= 6 and len(set(keep.tolist())) == len(keep)


@cpu_only_mmcv
def test_cpu_only_mmcv_passes_when_cuda_ops_were_not_wanted(capsys):
    assert check_mm.main([]) == 0
    assert "ok (CPU ops)" in capsys.readouterr().out


@cpu_only_mmcv
def test_cpu_only_mmcv_is_refused_when_cuda_ops_were_wanted():
    with pytest.raises(check_mm.StackCheckError, match=r"compiled without CUDA .*'not available'.*FORCE_CUDA=1"):
        check_mm.check_stack(want_cuda=True)
    # As install_mm.sh runs it: a failing exit status and the reason on stderr.
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "check_mm.py"), "--cuda"], capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 1
    assert "check_mm: FAILED: CUDA ops were wanted" in proc.stderr and "--force-build" in proc.stderr


@pytest.mark.cuda
def test_cuda_ops_run_on_the_gpu_and_match_the_cpu():
    """On a GPU machine after `make mm` (which then builds the CUDA ops)."""
    assert check_mm.compiled_cuda_version() is not None, "mmcv was built without CUDA ops: run `make mm` on the GPU node"
    assert "ops run on the GPU" in check_mm.check_stack(want_cuda=True)
