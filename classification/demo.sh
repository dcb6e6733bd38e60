#!/usr/bin/env bash
# The whole classification pipeline on CPU in a few minutes, no download:
# train DefMamba (Tiny width, dims 48) on the scikit-learn digits bundled with the package,
# keep the checkpoint, re-evaluate it with --resume ... --eval, and check ≥ 95 % top-1.
#
#   bash classification/demo.sh              # uses .venv/bin/python if present, else python3
#   PYTHON=python OUT=/tmp/demo bash classification/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT=${OUT:-output/demo}
# The demo's tensors are small: one thread is about as fast as two on an idle machine and far
# faster when other jobs share the cores (threads then wait for each other). Override to taste.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
CFG=configs/classification/defmamba_tiny_digits.yaml
RUN="$OUT/defmamba_tiny_digits/demo"
EVAL="$RUN/eval"         # --eval writes into the run folder's eval/, never over the run's own files
MIN_ACC=95

rm -rf "$RUN"            # a fresh run each time (otherwise it would auto-resume the finished one)
start=$(date +%s)
echo "== training on the embedded digits (CPU) -> $RUN"
"$PYTHON" classification/main.py --cfg "$CFG" --output "$OUT" --tag demo
echo "== re-evaluating the saved checkpoint with --resume $RUN/last.pth --eval"
"$PYTHON" classification/main.py --cfg "$CFG" --output "$OUT" --tag demo --resume "$RUN/last.pth" --eval
acc=$("$PYTHON" -c "import json,sys; print(f\"{json.load(open(sys.argv[1]))['model']['acc1']:.2f}\")" "$EVAL/eval.json")
elapsed=$(( $(date +%s) - start ))

cat <<MSG

== demo finished in ${elapsed}s
validation top-1 of the re-loaded checkpoint: ${acc}%
checkpoints:      $RUN/last.pth, $RUN/best.pth, $RUN/ckpt_epoch_*.pth
training log:     $RUN/log_rank0.txt   (per-epoch metrics: $RUN/metrics.jsonl)
TensorBoard:      tensorboard --logdir $RUN/tensorboard
evaluation:       $EVAL/eval.json  (log: $EVAL/log_rank0.txt)
config used:      $RUN/config.yaml
MSG
if ! "$PYTHON" -c "import sys; sys.exit(0 if float(sys.argv[1]) >= float(sys.argv[2]) else 1)" "$acc" "$MIN_ACC"; then
    echo "demo FAILED: top-1 ${acc}% is below ${MIN_ACC}%" >&2
    exit 1
fi
echo "demo OK: top-1 ${acc}% ≥ ${MIN_ACC}%"
