#!/usr/bin/env bash
# Host and GPU cost of a training step with chosen ops on their PyTorch formulations, next to the
# kernels: tools/benchmark.py --host-cost once per route set (DEFMAMBA_REFERENCE_OPS), alternated
# ROUNDS times in one session on one GPU (eager figures of host-bound models drift between runs,
# so only runs side by side compare). The peers run once per round, with the kernels.
# Usage (repository root): bash tools/device/reference_ops_ab.sh OUT_DIR [ROUNDS] [ROUTE_SET...]
#   ROUTE_SET  comma-separated op names (defmamba.ops.dispatch.OPS) forced to their reference; the
#              default sets: layer_norm, depthwise_conv, layer_norm,depthwise_conv
# Environment: MODELS (defmamba_tiny defmamba_small), PEERS (swin_tiny_patch4_window7_224), MODES
#   (train_fp16), BENCH_ARGS (--warmup 3 --repeats 5 --iters 3).
# Writes OUT_DIR/<round>_<set>.{json,log} ("kernels" for none forced) and OUT_DIR/ab.md.
set -euo pipefail
if [[ $# -lt 1 ]]; then sed -n '2,11p' "$0" >&2; exit 2; fi
out=$1
rounds=${2:-1}
shift $(( $# >= 2 ? 2 : 1 ))
sets=("$@")
[[ ${#sets[@]} -gt 0 ]] || sets=(layer_norm depthwise_conv layer_norm,depthwise_conv)
mkdir -p "$out"
read -r -a models <<< "${MODELS:-defmamba_tiny defmamba_small}"
read -r -a peers <<< "${PEERS:-swin_tiny_patch4_window7_224}"
read -r -a modes <<< "${MODES:-train_fp16}"
read -r -a bench_args <<< "${BENCH_ARGS:---warmup 3 --repeats 5 --iters 3}"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

measure() {  # NAME REFERENCE_OPS PEERS...
  local name=$1 ops=$2; shift 2
  DEFMAMBA_REFERENCE_OPS=$ops python3 tools/benchmark.py --host-cost "${bench_args[@]}" --modes "${modes[@]}" \
    --models "${models[@]}" --peers "$@" --json "$out/$name.json" > "$out/$name.log" 2>&1 || {
    echo "reference_ops_ab.sh: $name failed; the end of $out/$name.log:" >&2; tail -n 20 "$out/$name.log" >&2; exit 1; }
}

for round in $(seq 1 "$rounds"); do
  echo "== round $round: kernels"; measure "${round}_kernels" "" "${peers[@]}"
  for set in "${sets[@]}"; do
    echo "== round $round: reference $set"; measure "${round}_${set//,/+}" "$set"
  done
done
python3 - "$out" <<'PY'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
fields = [("launches", "launches_per_step", "{:.0f}"), ("host ms", "host_ms_per_step", "{:.1f}"),
          ("GPU ms", "gpu_ms_per_step", "{:.1f}"), ("eager img/s", "images_per_s", "{:.0f}"), ("peak GiB", "peak_memory_gib", "{:.2f}"),
          ("graphed img/s", "graphed_images_per_s", "{:.0f}")]
lines = ["| run | model | mode | " + " | ".join(f[0] for f in fields) + " |", "|---" * (3 + len(fields)) + "|"]
for path in sorted(out.glob("*.json"), key=lambda p: (p.stem.split("_", 1)[0], p.stem != p.stem.split("_", 1)[0] + "_kernels", p.stem)):
    for model, modes in json.loads(path.read_text())["results"].items():
        for mode, record in modes.items():
            cells = [("—" if record.get(key) is None else fmt.format(record[key])) for _, key, fmt in fields]
            lines.append(f"| {path.stem} | {model} | {mode} | " + " | ".join(cells) + " |")
(out / "ab.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
