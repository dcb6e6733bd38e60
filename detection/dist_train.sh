#!/usr/bin/env bash
# Usage: dist_train.sh CONFIG GPUS [train.py options]
# Starts GPUS processes with torchrun (NCCL on GPUs, gloo on CPU, where GPUS is the process count).
# Multi-node: NNODES, NODE_RANK, MASTER_ADDR, PORT as for torchrun. PYTHON picks the interpreter.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG GPUS [train.py options]" >&2; exit 2
fi
CONFIG=$1
GPUS=$2
shift 2
CORES=$(nproc 2>/dev/null || echo 1)
# torchrun sets 1 thread per process when unset, which starves CPU runs; use each process's share.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES / GPUS > 0 ? CORES / GPUS : 1 ))}
export MKL_NUM_THREADS=${MKL_NUM_THREADS:-$OMP_NUM_THREADS}
exec "${PYTHON:-python}" -m torch.distributed.run \
  --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}" \
  --master_port="${PORT:-29500}" --nproc_per_node="$GPUS" \
  "$(dirname "$0")/train.py" "$CONFIG" --launcher pytorch "$@"
