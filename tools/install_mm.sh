#!/usr/bin/env bash
# Install the optional OpenMMLab stack used by detection/ and segmentation/:
#   the library's `mm` extra (mmdet 3.3.0, mmsegmentation 1.2.2 and the run-time dependencies of
#   the stack, listed in pyproject.toml), then mmengine 0.10.7 and mmcv 2.1.0 (compiled ops, built
#   from the PyPI sdist against the installed torch) without their own dependency lists.
#
# Usage: tools/install_mm.sh [--force-build]
#   VENV=/path/to/venv          virtual environment to install into, with defmamba installed
#                               (default: the repository's .venv)
#   DEFMAMBA_WHEEL_CACHE=DIR    root of the mmcv wheel cache
#                               (default: ~/.cache/defmamba/wheels)
#   FORCE_CUDA=0|1              build the CUDA ops (default: 1 when torch sees a GPU)
#   MAX_JOBS=N                  parallel compile jobs (default: number of cores)
#   --force-build               rebuild mmcv from source even if a cached wheel exists
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
    -h|--help) sed -n '2,19p' "${BASH_SOURCE[0]}"; exit 0 ;;
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
if [[ -z "${FORCE_CUDA:-}" ]]; then
  FORCE_CUDA="$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')"
fi
FLAVOUR=cpu
[[ "$FORCE_CUDA" == "1" ]] && FLAVOUR=cuda
NPROC="$(nproc 2>/dev/null || echo 2)"
CACHE_DIR="${DEFMAMBA_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/defmamba/wheels}/torch-${TORCH_VERSION}/${FLAVOUR}"
mkdir -p "$CACHE_DIR"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
# Keep torch and numpy exactly as they are.
printf 'torch==%s\nnumpy==%s\n' "$TORCH_VERSION" "$NUMPY_VERSION" > "$WORK/constraints.txt"

echo "== installing into $VENV (torch $TORCH_VERSION, numpy $NUMPY_VERSION, mmcv ops: $FLAVOUR)"

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
else
  echo "== mmcv: building 2.1.0 from source (MAX_JOBS=${MAX_JOBS:-$NPROC}; about 6 minutes on 2 cores)"
  "${PIP[@]}" download --no-deps --no-binary :all: --no-build-isolation 'mmcv==2.1.0' -d "$WORK/sdist"
  tar -xzf "$WORK/sdist/mmcv-2.1.0.tar.gz" -C "$WORK"
  # torch >= 2.10 headers need C++20; mmcv 2.1.0 hard-codes -std=c++17.
  sed -i "s/'-std=c++17'/'-std=c++20'/g" "$WORK/mmcv-2.1.0/setup.py"
  grep -q "'-std=c++20'" "$WORK/mmcv-2.1.0/setup.py" || {
    echo "install_mm.sh: could not patch the C++ standard in mmcv's setup.py" >&2; exit 1; }
  MMCV_WITH_OPS=1 FORCE_CUDA="$FORCE_CUDA" MAX_JOBS="${MAX_JOBS:-$NPROC}" CFLAGS="${CFLAGS:--g0}" \
    "${PIP[@]}" wheel --no-build-isolation --no-deps -w "$WORK/wheel" "$WORK/mmcv-2.1.0"
  WHEEL="$(ls "$WORK"/wheel/mmcv-2.1.0-*.whl)"
  cp "$WHEEL" "$CACHE_DIR/"
  WHEEL="$CACHE_DIR/$(basename "$WHEEL")"
  echo "== mmcv: cached $WHEEL"
fi
"${PIP[@]}" install -c "$WORK/constraints.txt" --no-deps --force-reinstall "$WHEEL"

# 4. Check the stack imports and the compiled ops load.
"$PY" - <<'EOF'
import mmcv, mmdet, mmengine, mmseg
from mmcv.ops import RoIAlign, nms  # noqa: F401  (compiled ops)
print(f"mmengine {mmengine.__version__}, mmcv {mmcv.__version__}, "
      f"mmdet {mmdet.__version__}, mmseg {mmseg.__version__}: ok")
EOF
