#!/usr/bin/env bash
# Launch megamft training with torchrun on one node or several.
#   examples/cluster/launch.sh CONFIG.yaml [--config MORE.yaml] [section.key=value ...]
# Multi-node: run this on every node with the same MASTER_ADDR and NNODES, and its own NODE_RANK
# (examples/cluster/slurm.sbatch does that under SLURM).
set -euo pipefail
config="$1"; shift
: "${NNODES:=1}" "${NODE_RANK:=0}" "${GPUS_PER_NODE:=8}" "${MASTER_ADDR:=127.0.0.1}" "${MASTER_PORT:=29500}"
world=$((NNODES * GPUS_PER_NODE))
# Fail fast, before any GPU is touched: layout and divisibility checks for this world size.
python -m megamft check --config "$config" --world-size "$world" "$@"
export CUDA_DEVICE_MAX_CONNECTIONS=1   # lets megatron overlap TP communication with compute
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    -m megamft train --config "$config" "$@"
