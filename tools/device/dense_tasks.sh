#!/usr/bin/env bash
# Mask R-CNN and UperNet on one GPU, start to finish, on the synthetic shapes sets:
#   install  the OpenMMLab stack with mmcv's CUDA ops (tools/install_mm.sh), offline from $MM_WHEELS
#            (a folder made by tools/device/fetch_mm_wheels.sh); skipped when already installed
#   data     both sets (tools/make_dense_data.py) under $DATA_DIR; skipped when there
#   main     DefMamba-S, $ITERS iterations each: Mask R-CNN, then dist_test.sh on the held-out split
#            (box and mask mAP); UperNet, then dist_test.sh without and with --tta (mIoU)
#   peers    $PEERS (DefMamba-T, Swin-T, Swin-S), $PEER_ITERS iterations of each task, same data and batch,
#            then dist_test.sh on the held-out split (detection: every model keeps 100 boxes per image)
#   summary  iteration time (median and quartiles of single iterations: training logs each one) and
#            data time (medians after 20 warm-up iterations), peak memory, losses,
#            metrics and test time per image (median after 5 images) of every run in
#            OUT_DIR/summary.{json,md} (tools/mm_log_summary.py)
# Usage (repository root): bash tools/device/dense_tasks.sh OUT_DIR [STEP...]   (default: every step)
# STEP may name one task of a step: main:det, peers:seg (both tasks when none is named).
# Environment: MM_WHEELS (unset: pip uses its index), DATA_DIR (work_dirs/synthetic_data),
#   ITERS (300), PEER_ITERS (100), PEERS (defmamba-t swin-t swin-s), TRAIN_IMAGES (200), VAL_IMAGES (50),
#   AMP (--amp; set it empty for fp32), DET_CFG_OPTIONS / SEG_CFG_OPTIONS (more key=value overrides
#   for every detection / segmentation run), PYTHON (python3; its environment receives the install).
# Each run keeps its logs and work dirs in OUT_DIR/runs/<task>-<model>/; a failed step adds to that
# folder's error.txt and the other runs go on; the exit status is 1 when any run failed.
set -euo pipefail
if [[ $# -lt 1 ]]; then sed -n '2,21p' "$0" >&2; exit 2; fi
out=$1
shift
steps=("$@")
[[ ${#steps[@]} -gt 0 ]] || steps=(install data main peers summary)
for s in "${steps[@]}"; do
  case $s in
    install|data|main|main:det|main:seg|peers|peers:det|peers:seg|summary) ;;
    *) echo "dense_tasks.sh: unknown step '$s' (steps: install data main[:det|:seg] peers[:det|:seg] summary)" >&2
       exit 2 ;;
  esac
done

mkdir -p "$out/runs"
export PYTHON=${PYTHON:-python3} PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
data=${DATA_DIR:-work_dirs/synthetic_data}
export SYNTHETIC_COCO="$data/coco" SYNTHETIC_ADE="$data/ade"
amp=${AMP-"--amp"}
read -r -a det_options <<< "${DET_CFG_OPTIONS:-}"
read -r -a seg_options <<< "${SEG_CFG_OPTIONS:-}"
det=configs/detection/synthetic
seg=configs/segmentation/synthetic
failed=0

{ date; git rev-parse --short HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
  "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
} >> "$out/env.log"

install_stack() {
  if "$PYTHON" tools/check_mm.py --cuda > /dev/null 2>&1; then
    echo "== install: mmcv with CUDA ops, mmdet and mmseg are there"
    return
  fi
  local venv arch
  venv=$("$PYTHON" -c 'import sys; print(sys.prefix)')
  arch=${TORCH_CUDA_ARCH_LIST:-$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
  if [[ -n ${MM_WHEELS:-} ]]; then
    export PIP_NO_INDEX=1 PIP_FIND_LINKS
    PIP_FIND_LINKS=$(cd "$MM_WHEELS" && pwd)
  fi
  echo "== install: the library, then the OpenMMLab stack into $venv, mmcv's CUDA ops for compute" \
       "capability $arch only (log: $out/install.log)"
  # install_mm.sh reads the stack's requirements from the installed library's `mm` extra
  if ! { "$PYTHON" -m pip install --no-deps -e . &&
         PATH="$venv/bin:$PATH" FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=$arch VENV=$venv bash tools/install_mm.sh; } \
      > "$out/install.log" 2>&1; then
    tail -n 40 "$out/install.log"
    echo "dense_tasks.sh: the install failed; see $out/install.log" >&2
    exit 1
  fi
  tail -n 1 "$out/install.log" | tee -a "$out/env.log"
}

make_data() {  # FORMAT WIDTH HEIGHT
  local dir="$data/$1"
  if [[ -d $dir ]]; then
    echo "== data: $dir is there (delete it to make it again)"
    return
  fi
  echo "== data: $1 set in $dir"
  rm -rf "$dir.partial"
  "$PYTHON" tools/make_dense_data.py "$1" "$dir.partial" --train "${TRAIN_IMAGES:-200}" --val "${VAL_IMAGES:-50}" \
    --size "$2" "$3" | tee "$out/data-$1.log"
  mv "$dir.partial" "$dir"
}

# step RUN NAME COMMAND...: COMMAND's output goes to runs/RUN/NAME.log; a failure is added to runs/RUN/error.txt
step() {
  local run=$1 name=$2 log="$out/runs/$1/$2.log" status=0
  shift 2
  "$@" > "$log" 2>&1 || status=$?
  if [[ $status -eq 0 ]]; then return 0; fi
  failed=1
  local reason
  reason=$(grep -E '^[A-Za-z_.]*(Error|Exception)\b' "$log" | grep -v ChildFailedError | tail -n 1 || true)
  { echo "$name failed (exit $status)${reason:+: $reason}"; echo "the end of $log:"; tail -n 30 "$log"; } \
    >> "$out/runs/$run/error.txt"
  echo "!! $run: $name failed (exit $status), see $log" >&2
  return 1
}

# run_model TASK MODEL ITERS [TEST...]: train TASK (det|seg) with MODEL's overlay, then dist_test.sh on the
# held-out split once per TEST, a work dir name with an optional test.py option after a colon (test-tta:--tta)
run_model() {
  local task=$1 model=$2 iters=$3 tool config options test_options test name option
  shift 3
  if [[ $task == det ]]; then
    tool=detection config="$det/mask-rcnn_${model}_synthetic.py" options=("${det_options[@]}")
    # no score threshold: every model keeps its 100 best boxes per image (the COCO maximum), so that
    # the mask head and the pasting, and with them the test time, do not depend on how sure it is
    test_options=(model.test_cfg.rcnn.score_thr=0.0)
  else
    tool=segmentation config="$seg/upernet_${model}_synthetic.py" options=("${seg_options[@]}")
    test_options=()
  fi
  local run="$task-$model" dir="$out/runs/$task-$model"
  rm -rf "$dir"
  mkdir -p "$dir"
  echo "== $run: $iters training iterations"
  # no validation inside the training: the held-out split is scored by dist_test.sh below; one log
  # record per iteration, so that the summary's median and quartiles are over single iterations
  step "$run" train bash "$tool/dist_train.sh" "$config" 1 ${amp:+"$amp"} --work-dir "$dir/train" \
    --cfg-options train_cfg.max_iters="$iters" val_cfg=None val_dataloader=None val_evaluator=None \
    default_hooks.logger.interval=1 log_processor.window_size=1 "${options[@]}" || return 0
  for test in "$@"; do
    name=${test%%:*}
    option=${test#"$name"}
    option=${option#:}
    echo "== $run: $name"
    # one log line per image (the test batch is one image): the summary takes the median time per image
    step "$run" "$name" bash "$tool/dist_test.sh" "$config" "$(cat "$dir/train/last_checkpoint")" 1 \
      --work-dir "$dir/$name" ${option:+"$option"} --cfg-options default_hooks.logger.interval=1 \
      log_processor.window_size=1 ${test_options[@]+"${test_options[@]}"} "${options[@]}" || true
  done
}

for step_name in "${steps[@]}"; do
  tasks=(det seg)
  [[ $step_name == *:* ]] && tasks=("${step_name#*:}")
  case $step_name in
    install) install_stack ;;
    data) make_data coco 1333 800; make_data ade 512 512 ;;
    main*)
      for task in "${tasks[@]}"; do
        if [[ $task == det ]]; then run_model det defmamba-s "${ITERS:-300}" test
        else run_model seg defmamba-s "${ITERS:-300}" test test-tta:--tta; fi
      done ;;
    peers*)
      for task in "${tasks[@]}"; do
        for model in ${PEERS:-defmamba-t swin-t swin-s}; do
          run_model "$task" "$model" "${PEER_ITERS:-100}" test
        done
      done ;;
    summary)
      "$PYTHON" tools/mm_log_summary.py "$out"/runs/*/ --warmup 20 --test-warmup 5 --json "$out/summary.json" \
        --markdown "$out/summary.md" ;;
  esac
done
exit "$failed"
