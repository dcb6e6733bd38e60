#!/usr/bin/env bash
# Host and GPU cost of a training step in several variants, side by side on one GPU machine:
# tools/benchmark.py --host-cost once per variant, the variants alternated ROUNDS times in one
# session (eager figures of host-bound models drift between runs by ±15 %, so only runs side by
# side compare). The peers run once per round, with the first variant, and again with a backward=device
# variant (the backward's thread changes their host cost too).
# Usage (repository root): bash tools/device/host_cost_ab.sh OUT_DIR ROUNDS VARIANT...
#   VARIANT  kernels            this checkout as it is
#            tree=DIR           the library and tools in DIR, e.g. a baseline made here by
#                               git archive REV defmamba tools | tar -x -C .ab_before  (an ignored folder, carried)
#            reference=OPS      this checkout with OPS (comma-separated names of defmamba.ops.dispatch.OPS)
#                               forced to their PyTorch formulations (DEFMAMBA_REFERENCE_OPS)
#            cores=LIST         this checkout with the process pinned to the CPU cores LIST (taskset -c LIST;
#                               one core: autograd's device thread runs on the main thread's core)
#            backward=device    this checkout with every backward run on autograd's device thread (PyTorch's
#                               default; tools/benchmark.py --autograd-device-thread), not on the calling thread
#            (a tree=DIR variant runs DIR's own tools/benchmark.py, with that tree's default backward thread)
#   e.g. before/after a change:  bash tools/device/host_cost_ab.sh out 2 tree=.ab_before kernels
#        routes:                 bash tools/device/host_cost_ab.sh out 1 kernels reference=layer_norm \
#                                  reference=depthwise_conv reference=layer_norm,depthwise_conv
#        autograd's threads:     bash tools/device/host_cost_ab.sh out 2 kernels backward=device cores=5
# Environment: MODELS (defmamba_tiny defmamba_small), PEERS (swin_tiny_patch4_window7_224; set it empty
#   for none), MODES (train_fp16), BENCH_ARGS (--warmup 3 --repeats 5 --iters 3).
# Writes OUT_DIR/<round>_<variant>.{json,log} and OUT_DIR/ab.md: launches, host ms, GPU ms, eager
# images/s, peak GiB and graphed images/s per run, model and mode.
set -euo pipefail
if [[ $# -lt 3 ]]; then sed -n '2,25p' "$0" >&2; exit 2; fi
out=$1
rounds=$2
shift 2
variants=("$@")
for variant in "${variants[@]}"; do
  case $variant in
    kernels | reference=?* | cores=?* | backward=device) ;;
    tree=?*) [[ -f ${variant#tree=}/tools/benchmark.py && -d ${variant#tree=}/defmamba ]] || {
      echo "host_cost_ab.sh: ${variant#tree=} holds no defmamba/ and tools/benchmark.py (make it with" \
           "git archive REV defmamba tools | tar -x -C DIR)" >&2; exit 2; } ;;
    *) echo "host_cost_ab.sh: variant '$variant' is not kernels, tree=DIR, reference=OPS, cores=LIST or" \
            "backward=device" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
read -r -a models <<< "${MODELS:-defmamba_tiny defmamba_small}"
read -r -a peers <<< "${PEERS-swin_tiny_patch4_window7_224}"
read -r -a modes <<< "${MODES:-train_fp16}"
read -r -a bench_args <<< "${BENCH_ARGS:---warmup 3 --repeats 5 --iters 3}"
export PYTHONUNBUFFERED=1

measure() {  # RUN_NAME VARIANT PEERS...
  local name=$1 variant=$2 tree=$PWD ops="" pin=() thread=(); shift 2
  case $variant in
    tree=*) tree=$(cd "${variant#tree=}" && pwd) ;;
    reference=*) ops=${variant#reference=} ;;
    cores=*) pin=(taskset -c "${variant#cores=}") ;;
    backward=device) thread=(--autograd-device-thread) ;;
  esac
  (cd "$tree" && DEFMAMBA_REFERENCE_OPS=$ops PYTHONPATH="$tree" ${pin[@]+"${pin[@]}"} python3 tools/benchmark.py --host-cost \
     ${thread[@]+"${thread[@]}"} "${bench_args[@]}" --modes "${modes[@]}" --models "${models[@]}" --peers "$@" \
     --json "$out/$name.json") \
    > "$out/$name.log" 2>&1 || {
    echo "host_cost_ab.sh: $name failed; the end of $out/$name.log:" >&2; tail -n 20 "$out/$name.log" >&2; exit 1; }
}

for round in $(seq 1 "$rounds"); do
  for i in "${!variants[@]}"; do
    variant=${variants[$i]}
    name=${round}_$(tr -c 'A-Za-z0-9_+\n' '_' <<< "${variant//,/+}")
    echo "== round $round: $variant"
    if [[ $i -eq 0 || $variant == backward=device ]]; then measure "$name" "$variant" "${peers[@]}"; else measure "$name" "$variant"; fi
  done
done
python3 - "$out" "${variants[@]}" <<'PY'
import json
import re
import sys
from pathlib import Path

out, variants = Path(sys.argv[1]), sys.argv[2:]
fields = [("launches", "launches_per_step", "{:.0f}"), ("host ms", "host_ms_per_step", "{:.1f}"),
          ("GPU ms", "gpu_ms_per_step", "{:.1f}"), ("eager img/s", "images_per_s", "{:.0f}"),
          ("peak GiB", "peak_memory_gib", "{:.2f}"), ("graphed img/s", "graphed_images_per_s", "{:.0f}")]
stems = [re.sub(r"[^A-Za-z0-9_+]", "_", v.replace(",", "+")) for v in variants]
runs = sorted((p for p in out.glob("*_*.json") if p.stem.split("_", 1)[0].isdigit() and p.stem.split("_", 1)[1] in stems),
              key=lambda p: (int(p.stem.split("_", 1)[0]), stems.index(p.stem.split("_", 1)[1])))
lines = ["| round | variant | model | mode | " + " | ".join(f[0] for f in fields) + " |", "|---" * (4 + len(fields)) + "|"]
for path in runs:
    round_, stem = path.stem.split("_", 1)
    for model, modes in json.loads(path.read_text())["results"].items():
        for mode, record in modes.items():
            cells = ["—" if record.get(key) is None else fmt.format(record[key]) for _, key, fmt in fields]
            lines.append(f"| {round_} | {variants[stems.index(stem)]} | {model} | {mode} | " + " | ".join(cells) + " |")
(out / "ab.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
