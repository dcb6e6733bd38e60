#!/usr/bin/env bash
# Compile the CUDA selective-scan extension for sm_80 and sm_90 in a temporary directory (no GPU
# needed), so build breakage is caught on CPU-only machines. Usage:
#   kernels/selective_scan/check_build.sh [python]      (default: .venv/bin/python, else python3)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PY="${1:-}"
if [[ -z "$PY" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
cp -r "$HERE"/csrc "$HERE"/setup.py "$HERE"/build_config.py "$TMP"/
cd "$TMP"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
start=$(date +%s)
"$PY" setup.py -q build_ext --build-temp "$TMP/build" --build-lib "$TMP/lib"
so=$(find "$TMP/lib" -name 'defmamba_scan_cuda*.so' | head -1)
[[ -n "$so" ]] || { echo "check_build: no extension produced" >&2; exit 1; }
for arch in sm_80 sm_90; do
  if command -v cuobjdump >/dev/null; then
    cuobjdump --list-elf "$so" | grep -q "$arch" || { echo "check_build: $arch code missing" >&2; exit 1; }
  fi
done
echo "check_build: OK ($(basename "$so"), archs $TORCH_CUDA_ARCH_LIST, $(( $(date +%s) - start )) s)"
