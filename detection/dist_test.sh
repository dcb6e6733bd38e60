#!/usr/bin/env bash
# Usage: dist_test.sh CONFIG CHECKPOINT GPUS [test.py options]
# Starts GPUS processes with torchrun (NCCL on GPUs, gloo on CPU, where GPUS is the process count).
# Multi-node: NNODES, NODE_RANK, MASTER_ADDR, PORT as for torchrun. PYTHON picks the interpreter.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 CONFIG CHECKPOINT GPUS [test.py options]" >&2; exit 2
fi
CONFIG=$1
CHECKPOINT=$2
GPUS=$3
shift 3
CORES=$(nproc 2>/dev/null || echo 1)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES / GPUS > 0 ? CORES / GPUS : 1 ))}
export MKL_NUM_THREADS=${MKL_NUM_THREADS:-$OMP_NUM_THREADS}
exec "${PYTHON:-python}" -m torch.distributed.run \
  --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}" \
  --master_port="${PORT:-29500}" --nproc_per_node="$GPUS" \
  "$(dirname "$0")/test.py" "$CONFIG" "$CHECKPOINT" --launcher pytorch "$@"
