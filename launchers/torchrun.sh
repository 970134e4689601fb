#!/usr/bin/env bash
# Data-parallel training with a distopt optimizer under torchrun.
#   single node:  launchers/torchrun.sh 2 --optimizer lamb
#   multi-node:   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 launchers/torchrun.sh 8 --optimizer adamw   (on every node)
set -euo pipefail
NPROC=${1:-2}; shift || true
if [ "${NNODES:-1}" -gt 1 ]; then
  exec torchrun --nnodes "$NNODES" --node_rank "${NODE_RANK:?}" --nproc_per_node "$NPROC" \
    --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:?}:${MASTER_PORT:-29500}" \
    "$(dirname "$0")/../examples/ddp_train.py" "$@"
fi
exec torchrun --standalone --nproc_per_node "$NPROC" "$(dirname "$0")/../examples/ddp_train.py" "$@"
