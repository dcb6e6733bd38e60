#!/usr/bin/env bash
# Install the optional OpenMMLab stack used by detection/ and segmentation/:
#   the library's `mm` extra (mmdet 3.3.0, mmsegmentation 1.2.2 and the run-time dependencies of
#   the stack, listed in pyproject.toml), then mmengine 0.10.7 and mmcv 2.1.0 (compiled ops, built
#   from the PyPI sdist against the installed torch) without their own dependency lists.
#
# Usage: tools/install_mm.sh [--force-build]
#   VENV=/path/to/venv          virtual environment to install into, with defmamba installed
#                               (default: the repository's .venv)
#   FORCE_CUDA=0|1              build mmcv's CUDA ops (default: 1 when torch sees a GPU);
#                               FORCE_CUDA=1 builds them on a node without a GPU too
#   TORCH_CUDA_ARCH_LIST=LIST   GPU architectures of the CUDA ops (default: "8.0;9.0+PTX",
#                               plus the visible GPUs' own: A100, H100/H200, newer via PTX)
#   CUDA_HOME=DIR               CUDA toolkit for the CUDA ops (default: torch's guess,
#                               else /usr/local/cuda)
#   DEFMAMBA_WHEEL_CACHE=DIR    root of the mmcv wheel cache (default: ~/.cache/defmamba/wheels);
#                               one folder per build: torch-<version>/cpu, or
#                               torch-<version>/cuda-<CUDA version>-arch-<arch list>
#   MAX_JOBS=N                  parallel compile jobs (default: number of cores)
#   --force-build               rebuild mmcv from source even if a cached wheel exists
#
# The last step (tools/check_mm.py) runs mmcv's ops; where CUDA ops were wanted it fails unless
# mmcv was compiled with CUDA and, with a GPU visible, its ops run there. A wheel enters the
# cache only after passing it.
#
# Nothing here touches torch or numpy: both are pinned to the versions already
# installed. mmengine is installed without its dependencies because it asks for
# opencv-python, which would sit next to the headless OpenCV of the extra; mmcv
# because its wheel is built here.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO_ROOT/.venv}"
PY="$VENV/bin/python"
FORCE_BUILD=0
for arg in "$@"; do
  case "$arg" in
    --force-build) FORCE_BUILD=1 ;;
    -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "install_mm.sh: unknown argument '$arg' (only --force-build is accepted)" >&2; exit 2 ;;
  esac
done

if [[ ! -x "$PY" ]]; then
  echo "install_mm.sh: no python at $PY; set VENV=/path/to/venv (a venv that already has torch)" >&2
  exit 1
fi
if ! "$PY" -c 'import torch' 2>/dev/null; then
  echo "install_mm.sh: torch is not importable from $PY; install the base requirements first" >&2
  exit 1
fi

PIP=("$PY" -m pip)
TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__)')"
NUMPY_VERSION="$("$PY" -c 'import numpy; print(numpy.__version__)')"
case "${FORCE_CUDA:-}" in
  "") WANT_CUDA="$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')" ;;
  0|1) WANT_CUDA="$FORCE_CUDA" ;;
  *) echo "install_mm.sh: FORCE_CUDA must be 0 or 1, got '$FORCE_CUDA'" >&2; exit 2 ;;
esac
if [[ "$WANT_CUDA" == "1" ]]; then
  TORCH_CUDA="$("$PY" -c 'import torch; print(torch.version.cuda or "")')"
  if [[ -z "$TORCH_CUDA" ]]; then
    echo "install_mm.sh: CUDA ops wanted, but torch $TORCH_VERSION is a CPU build; install a CUDA build" \
         "of torch, or set FORCE_CUDA=0 for CPU ops only" >&2
    exit 1
  fi
  # torch takes the toolkit to be the folder above `nvcc` on PATH, which misses it where nvcc is
  # a wrapper script (as kernels/selective_scan/build_config.py also handles).
  NVCC_ON_PATH="$(command -v nvcc || true)"
  if [[ -z "${CUDA_HOME:-}${CUDA_PATH:-}" && -f /usr/local/cuda/include/cuda_runtime_api.h ]] &&
     [[ -z "$NVCC_ON_PATH" || ! -f "$(dirname "$(readlink -f "$NVCC_ON_PATH")")/../include/cuda_runtime_api.h" ]]; then
    export CUDA_HOME=/usr/local/cuda
  fi
  TOOLKIT="$("$PY" -c 'from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or "")' 2>/dev/null)"
  if [[ -z "$TOOLKIT" || ! -x "$TOOLKIT/bin/nvcc" ]]; then
    echo "install_mm.sh: CUDA ops wanted, but no CUDA toolkit (nvcc) found; set CUDA_HOME, or FORCE_CUDA=0" \
         "for CPU ops only" >&2
    exit 1
  fi
  # torch's CUDA headers include cuSPARSE/cuBLAS headers, which a toolkit of the compiler alone lacks;
  # torch's own CUDA wheels (nvidia/cu*/include) carry them.
  if [[ ! -f "$TOOLKIT/include/cusparse.h" ]]; then
    WHEEL_HEADERS="$("$PY" -c '
import glob, os, torch
site = os.path.dirname(os.path.dirname(torch.__file__))
print(next(iter(sorted(glob.glob(os.path.join(site, "nvidia", "*", "include", "cusparse.h")))), "").rsplit("/", 1)[0])')"
    if [[ -n "$WHEEL_HEADERS" ]]; then
      export CPATH="${CPATH:+$CPATH:}$WHEEL_HEADERS"
    fi
  fi
  CUDA_VERSION="$("$TOOLKIT/bin/nvcc" --version | sed -n 's/.*release \([0-9][0-9.]*\),.*/\1/p')"
  # Without a list torch compiles for the visible GPUs only, and fails with none visible.
  if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
    TORCH_CUDA_ARCH_LIST="$("$PY" -c '
import torch
archs = {(8, 0), (9, 0)} | {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
print(";".join(f"{major}.{minor}" for major, minor in sorted(archs)) + "+PTX")')"
  fi
  export TORCH_CUDA_ARCH_LIST
  FLAVOUR="cuda-${CUDA_VERSION}-arch-$(tr ' ;' '__' <<<"$TORCH_CUDA_ARCH_LIST")"
  # mmcv's setup.py builds the CUDA ops when FORCE_CUDA=1 or torch sees a GPU.
  BUILD_ENV=(FORCE_CUDA=1)
  DESCRIPTION="CUDA $CUDA_VERSION, archs $TORCH_CUDA_ARCH_LIST"
else
  FLAVOUR=cpu
  BUILD_ENV=(FORCE_CUDA=0 CUDA_VISIBLE_DEVICES=)  # CPU ops only, even where a GPU is visible
  DESCRIPTION="CPU"
fi
NPROC="$(nproc 2>/dev/null || echo 2)"
CACHE_DIR="${DEFMAMBA_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/defmamba/wheels}/torch-${TORCH_VERSION}/${FLAVOUR}"
mkdir -p "$CACHE_DIR"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
# Keep torch and numpy exactly as they are.
printf 'torch==%s\nnumpy==%s\n' "$TORCH_VERSION" "$NUMPY_VERSION" > "$WORK/constraints.txt"

echo "== installing into $VENV (torch $TORCH_VERSION, numpy $NUMPY_VERSION, mmcv ops: $DESCRIPTION)"

# 1. The library's `mm` extra (read from the installed defmamba's metadata, so pyproject.toml
#    stays the one list): mmdet, mmsegmentation and what the stack needs at run time.
MM_REQUIREMENTS="$("$PY" - <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, requires

from packaging.requirements import Requirement

try:
    declared = requires("defmamba") or []
except PackageNotFoundError:
    sys.exit("install_mm.sh: defmamba is not installed in this environment; install it first: pip install -e '.[mm]'")
for line in declared:
    marker = Requirement(line).marker
    if marker is not None and marker.evaluate({"extra": "mm"}) and not marker.evaluate({"extra": ""}):
        print(line.split(";")[0].strip())
EOF
)"
[[ -n "$MM_REQUIREMENTS" ]] || {
  echo "install_mm.sh: the defmamba installed in $VENV declares no 'mm' extra; reinstall it from this checkout: pip install -e '.[mm]'" >&2
  exit 1; }
mapfile -t MM_REQUIREMENTS <<< "$MM_REQUIREMENTS"
"${PIP[@]}" install -c "$WORK/constraints.txt" "${MM_REQUIREMENTS[@]}"

# 2. mmengine (pure python).
"${PIP[@]}" install -c "$WORK/constraints.txt" --no-deps 'mmengine==0.10.7'

# 3. mmcv 2.1.0 with compiled ops: reuse the cached wheel or build it from the sdist.
cached_wheel() {
  "$PY" - "$CACHE_DIR" <<'EOF'
import sys
from pathlib import Path
from packaging.tags import sys_tags
from packaging.utils import parse_wheel_filename

supported = set(sys_tags())
for path in sorted(Path(sys.argv[1]).glob("mmcv-2.1.0-*.whl")):
    _, _, _, tags = parse_wheel_filename(path.name)
    if tags & supported:
        print(path)
        break
EOF
}

WHEEL=""
[[ "$FORCE_BUILD" == "0" ]] && WHEEL="$(cached_wheel)"
if [[ -n "$WHEEL" ]]; then
  echo "== mmcv: using cached wheel $WHEEL"
  BUILT=0
else
  # mmcv's setup.py imports pkg_resources, which setuptools 81 removed; Python 3.12 venvs have none.
  "$PY" -c 'import pkg_resources' 2>/dev/null || "${PIP[@]}" install -c "$WORK/constraints.txt" 'setuptools<81'
  echo "== mmcv: building 2.1.0 from source (MAX_JOBS=${MAX_JOBS:-$NPROC}; about 6 minutes on 2 cores for" \
       "CPU ops, far longer with CUDA ops)"
  "${PIP[@]}" download --no-deps --no-binary :all: --no-build-isolation 'mmcv==2.1.0' -d "$WORK/sdist"
  tar -xzf "$WORK/sdist/mmcv-2.1.0.tar.gz" -C "$WORK"
  # torch >= 2.10 headers need C++20; mmcv 2.1.0 hard-codes -std=c++17.
  sed -i "s/'-std=c++17'/'-std=c++20'/g" "$WORK/mmcv-2.1.0/setup.py"
  grep -q "'-std=c++20'" "$WORK/mmcv-2.1.0/setup.py" || {
    echo "install_mm.sh: could not patch the C++ standard in mmcv's setup.py" >&2; exit 1; }
  # The extension must link libstdc++ as a shared library (see shared_libstdcxx_compiler.sh).
  BUILD_CXX="$(bash "$REPO_ROOT/tools/shared_libstdcxx_compiler.sh")" || exit 1
  [[ "$BUILD_CXX" == "${CXX:-c++}" ]] || echo "== mmcv: CXX=${CXX:-c++} links libstdc++ statically; building with $BUILD_CXX"
  env "${BUILD_ENV[@]}" CXX="$BUILD_CXX" MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$NPROC}" CFLAGS="${CFLAGS:--g0}" \
    "${PIP[@]}" wheel --no-build-isolation --no-deps -w "$WORK/wheel" "$WORK/mmcv-2.1.0"
  WHEEL="$(ls "$WORK"/wheel/mmcv-2.1.0-*.whl)"
  BUILT=1
fi
"${PIP[@]}" install -c "$WORK/constraints.txt" --no-deps --force-reinstall "$WHEEL"

# 4. Check the stack imports and mmcv's ops run (on the GPU too where CUDA ops were wanted);
#    only a wheel that passes is cached.
CHECK_ARGS=()
[[ "$WANT_CUDA" == "1" ]] && CHECK_ARGS=(--cuda)
if ! "$PY" "$REPO_ROOT/tools/check_mm.py" ${CHECK_ARGS[@]+"${CHECK_ARGS[@]}"}; then
  if [[ "$BUILT" == "0" ]]; then
    echo "install_mm.sh: the cached wheel $WHEEL failed the check; rebuild with --force-build" >&2
  fi
  exit 1
fi
if [[ "$BUILT" == "1" ]]; then
  cp "$WHEEL" "$CACHE_DIR/"
  echo "== mmcv: cached $CACHE_DIR/$(basename "$WHEEL")"
fi
