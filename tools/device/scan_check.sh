#!/usr/bin/env bash
# Selective-scan check on a GPU machine: GPU tests of every backend, then the benchmark.
# Usage (from the repository root): bash tools/device/scan_check.sh [OUT_DIR]
# Writes tests.log, bench.log and bench.json into OUT_DIR (default: $OUT, else ./output/scan).
set -o pipefail
out="${1:-${OUT:-output/scan}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv | tee "$out/env.log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$out/env.log"
python3 -c "from defmamba.ops.selective_scan import available_backends as a; print('backends', a('cuda'))" | tee -a "$out/env.log"
xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
python3 -m pytest -q -rf -p no:cacheprovider $xdist tests/test_scan_gpu.py 2>&1 | tee "$out/tests.log"
tests_rc=$?
python3 tools/benchmark_scan.py --out "$out/bench.json" "${@:2}" 2>&1 | tee "$out/bench.log"
bench_rc=$?
echo "tests rc=$tests_rc bench rc=$bench_rc"
exit $(( tests_rc || bench_rc ))
