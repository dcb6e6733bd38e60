#!/usr/bin/env bash
# The GPU test suite (tests marked `cuda`) on one GPU machine, in two parts that each fit a call of
# ten minutes: `main`, every GPU test but the slow torch.compile ones, 8 at a time (366 s on an
# H100, 2026-12-07); `compile`, those (Inductor compiles each stage's token mixer, forward and
# backward, per scan backend and dtype: minutes each), side by side. Test names are printed as
# each test ends (-v), so a run stopped at its time limit still names its failures.
# Usage (repository root, the scan extension built): bash tools/device/gpu_suite.sh OUT_DIR [main|compile|all]
# Environment: SUITE_TIMEOUT (seconds per part, default 540).
# Writes OUT_DIR/gpu_suite_<part>.log and, per part, its last line to stdout. The exit status is 1
# when a part failed or ran out of time.
set -uo pipefail
if [[ $# -lt 1 || $# -gt 2 ]]; then sed -n '2,10p' "$0" >&2; exit 2; fi
out=$1
part=${2:-all}
if [[ $part != main && $part != compile && $part != all ]]; then
  echo "unknown part '$part': main, compile or all" >&2
  exit 2
fi
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
slow=(tests/test_compile.py::test_regional_compile_training_matches_eager_gpu
      tests/test_cls_app.py::test_gpu_training_with_compile)
failed=0

run_part() {  # NAME PYTEST_ARGUMENTS...
  local name=$1 log="$out/gpu_suite_$1.log"
  shift
  timeout "${SUITE_TIMEOUT:-540}" python3 -m pytest -m cuda -v -rfE --tb=short -p no:cacheprovider \
    --durations=15 "$@" > "$log" 2>&1
  local status=$?
  [[ $status -eq 124 ]] && echo "gpu_suite $name: stopped at its time limit" >> "$log"
  [[ $status -ne 0 ]] && failed=1
  echo "$name: $(tail -n 1 "$log")"
}

deselect=()
for test in "${slow[@]}"; do deselect+=(--deselect "$test"); done
[[ $part == compile ]] || run_part main -n 8 tests/ "${deselect[@]}"
[[ $part == main ]] || run_part compile -n 4 "${slow[@]}"
exit $failed
