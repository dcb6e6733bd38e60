"""tools/shared_libstdcxx_compiler.sh, which tools/install_mm.sh asks for the compiler of mmcv's
extension: a compiler that links libstdc++ statically (an extension built with it crashed beside
torch) is passed over for one that links it as a shared library."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "shared_libstdcxx_compiler.sh"

pytestmark = pytest.mark.skipif(not (shutil.which("g++") and shutil.which("readelf")), reason="needs g++ and readelf")


def _pick(cxx: str, path: str = os.environ["PATH"]) -> subprocess.CompletedProcess:
    env = dict(os.environ, CXX=cxx, PATH=path)
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)


def _static_wrapper(folder: Path) -> Path:
    wrapper = folder / "g++-static"
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("g++")} "$@" -static-libstdc++\n')
    wrapper.chmod(0o755)
    return wrapper


def test_keeps_a_compiler_that_links_libstdcxx_shared():
    result = _pick("g++")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "g++"


def test_passes_over_a_compiler_that_links_libstdcxx_statically(tmp_path):
    result = _pick(str(_static_wrapper(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in ("g++", "/usr/bin/g++")

