#!/usr/bin/env bash
# Host cost before and after a change, on one GPU machine: tools/benchmark.py --host-cost of a
# baseline tree and of this checkout, alternated ROUNDS times in one session (eager figures of
# host-bound models drift between runs by ±15 %, so only pairs run side by side compare).
# Usage (repository root): bash tools/device/host_cost_ab.sh BASE_DIR OUT_DIR [ROUNDS]
#   BASE_DIR  the baseline's library and tools, e.g. made here by
#             git archive REV defmamba tools | tar -x -C .ab_before   (an ignored folder, carried)
#   ROUNDS    before/after pairs (default 2)
# Environment: MODELS (defmamba_tiny defmamba_small), PEERS (swin_tiny_patch4_window7_224), MODES
#   (train_fp16 train_bf16 infer_fp16), BENCH_ARGS (--warmup 3 --repeats 5 --iters 3).
# Writes OUT_DIR/{before,after}_<round>.{json,log} and OUT_DIR/ab.md, a table of launches, host ms,
# GPU ms and eager and graphed images/s per model and mode, before → after in each round.
set -euo pipefail
if [[ $# -lt 2 ]]; then sed -n '2,13p' "$0" >&2; exit 2; fi
base=$(cd "$1" && pwd)
out=$2
rounds=${3:-2}
[[ -f $base/tools/benchmark.py && -d $base/defmamba ]] || {
  echo "host_cost_ab.sh: $base holds no defmamba/ and tools/benchmark.py (make it with git archive REV defmamba tools)" >&2
  exit 2; }
mkdir -p "$out"
read -r -a models <<< "${MODELS:-defmamba_tiny defmamba_small}"
read -r -a peers <<< "${PEERS:-swin_tiny_patch4_window7_224}"
read -r -a modes <<< "${MODES:-train_fp16 train_bf16 infer_fp16}"
read -r -a bench_args <<< "${BENCH_ARGS:---warmup 3 --repeats 5 --iters 3}"
export PYTHONUNBUFFERED=1

measure() {  # TREE NAME
  (cd "$1" && PYTHONPATH="$1" python3 tools/benchmark.py --host-cost "${bench_args[@]}" --modes "${modes[@]}" \
     --models "${models[@]}" --peers "${peers[@]}" --json "$out/$2.json") > "$out/$2.log" 2>&1 || {
    echo "host_cost_ab.sh: $2 failed; the end of $out/$2.log:" >&2; tail -n 20 "$out/$2.log" >&2; exit 1; }
}

for round in $(seq 1 "$rounds"); do
  echo "== round $round: before"; measure "$base" "before_$round"
  echo "== round $round: after"; measure "$PWD" "after_$round"
done
python3 - "$out" "$rounds" <<'EOF'
import json
import sys
from pathlib import Path

out, rounds = Path(sys.argv[1]), int(sys.argv[2])
keys = [("launches", "launches_per_step"), ("host ms", "host_ms_per_step"), ("GPU ms", "gpu_ms_per_step"),
        ("eager img/s", "images_per_s"), ("graphed img/s", "graphed_images_per_s")]


def rows(path):
    """(model, mode) → the host-cost record of one tools/benchmark.py --host-cost JSON."""
    results = json.loads(path.read_text())["results"]
    return {(model, mode): record for model, modes in results.items() for mode, record in modes.items()}


lines = ["| round | model | mode | " + " | ".join(k for k, _ in keys) + " |", "|---" * (3 + len(keys)) + "|"]
for i in range(1, rounds + 1):
    before, after = rows(out / f"before_{i}.json"), rows(out / f"after_{i}.json")
    for key in sorted(before.keys() & after.keys()):
        cells = []
        for _, field in keys:
            b, a = before[key].get(field), after[key].get(field)
            cells.append("—" if b is None or a is None else f"{b:.0f} → {a:.0f}" if field == "launches_per_step"
                         else f"{b:.1f} → {a:.1f}")
        lines.append(f"| {i} | {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
(out / "ab.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
