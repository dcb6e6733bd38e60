#!/usr/bin/env bash
# Graphed training on one GPU machine, in one call of a few minutes: the GPU tests of the graph
# paths, then DefMamba trained three ways in one session (the eager loop; the same loop with
# model.set_graphed_training(); every step replayed from one CUDA graph) next to the peers' eager
# loop, and, where mmseg is installed, UperNet with and without the graphed backbone.
# Usage (repository root, the scan extension built): bash tools/device/graphed_training_check.sh OUT_DIR
# Environment: MODELS (defmamba_tiny defmamba_small), PEERS (swin_tiny_patch4_window7_224
#   swin_small_patch4_window7_224), MODES (train_fp16 train_bf16), BENCH_ARGS (--warmup 3 --repeats 7
#   --iters 3), SEG_ITERS (60; 0 skips UperNet), DENSE_DIR (/tmp/graphed_training_check: UperNet's
#   data and work dirs, outside OUT_DIR).
# Writes into OUT_DIR: tests.log, eager.{json,log}, graphed_training.{json,log}, graphs.{json,log}
# and, with UperNet, seg_eager.md (DefMamba-T and Swin-T) and seg_graphed.md (DefMamba-T, graphed
# backbone). The exit status is 1 when a test or a run failed.
set -uo pipefail
if [[ $# -ne 1 ]]; then sed -n '2,14p' "$0" >&2; exit 2; fi
out=$1
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
read -r -a models <<< "${MODELS:-defmamba_tiny defmamba_small}"
read -r -a peers <<< "${PEERS:-swin_tiny_patch4_window7_224 swin_small_patch4_window7_224}"
read -r -a modes <<< "${MODES:-train_fp16 train_bf16}"
read -r -a bench_args <<< "${BENCH_ARGS:---warmup 3 --repeats 7 --iters 3}"
dense=${DENSE_DIR:-/tmp/graphed_training_check}
failed=0

nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/tests.log"
python3 -c "from defmamba.ops.selective_scan import available_backends as a; print('scan backends', a('cuda'))" \
  | tee -a "$out/tests.log"
# One process per file: a failed recording leaves its process's CUDA random numbers unusable, which
# would fail every later test of that process (defmamba/cuda_graphs.py, AFTER_A_FAILED_RECORDING).
for tests in tests/test_graphed_training.py tests/test_ddp_graphs.py tests/test_cls_units.py tests/test_cls_benchmark.py \
             tests/test_cls_app.py::test_gpu_training_with_graphed_training_and_accumulation \
             "tests/test_mm_tasks.py -k graphed"; do
  # shellcheck disable=SC2086  # "FILE -k NAME" splits into pytest's arguments
  if ! python3 -m pytest -q -rf -p no:cacheprovider -m cuda $tests >> "$out/tests.log" 2>&1; then failed=1; fi
  tail -n 1 "$out/tests.log"
done

bench=(python3 tools/benchmark.py "${bench_args[@]}" --models "${models[@]}" --modes "${modes[@]}")
for run in eager graphed_training graphs; do
  case $run in
    eager) args=(--peers "${peers[@]}") ;;  # the peers run once, eager, beside DefMamba's eager loop
    graphed_training) args=(--peers --graphed-training) ;;
    graphs) args=(--peers --cuda-graphs) ;;
  esac
  echo "== $run"
  if ! "${bench[@]}" "${args[@]}" --json "$out/$run.json" > "$out/$run.log" 2>&1; then failed=1; fi
  grep '^|' "$out/$run.log" || tail -n 5 "$out/$run.log"
done

seg_iters=${SEG_ITERS:-60}
if [[ $seg_iters -gt 0 ]] && python3 -c "import mmseg" 2> /dev/null; then
  DATA_DIR="$dense/data" TRAIN_IMAGES=100 VAL_IMAGES=30 bash tools/device/dense_tasks.sh "$dense/data_logs" data \
    > /dev/null || failed=1
  for variant in eager graphed; do
    if [[ $variant == eager ]]; then peers_seg="defmamba-t swin-t" options=""
    else peers_seg="defmamba-t" options="model.backbone.graphed_training=True"; fi
    echo "== UperNet, $variant"
    if ! DATA_DIR="$dense/data" PEERS=$peers_seg PEER_ITERS=$seg_iters SEG_CFG_OPTIONS=$options \
        bash tools/device/dense_tasks.sh "$dense/$variant" peers:seg summary > "$dense/$variant.log" 2>&1; then
      failed=1
      cat "$dense/$variant"/runs/*/error.txt 2> /dev/null | head -n 20
    fi
    cp "$dense/$variant/summary.md" "$out/seg_$variant.md" 2> /dev/null && cat "$out/seg_$variant.md"
  done
else
  echo "== UperNet skipped (SEG_ITERS=$seg_iters, or mmseg not installed: tools/device/dense_tasks.sh OUT install)"
fi
exit "$failed"
