#!/usr/bin/env bash
# Launch megamft training on one node or several: torchrun's options, through `megamft launch`.
#   examples/cluster/launch.sh CONFIG.yaml [--config MORE.yaml] [section.key=value ...]
# Multi-node: run this on every node with the same MASTER_ADDR and NNODES, and its own NODE_RANK
# (examples/cluster/slurm.sbatch does that under SLURM).
# Preemption: SIGTERM or SIGUSR1 to this process (or to every process of the job, as SLURM does)
# makes the workers finish their step, save a checkpoint and exit; this command then exits 0.
# `megamft launch` is torchrun whose agent passes those two signals to its workers and waits for
# them, however long the save takes, instead of killing them after 30 s and exiting 1.
# Environment: the workers inherit this one. megamft sets CUDA_DEVICE_MAX_CONNECTIONS=1 itself when the
# layout has TP > 1 or CP > 1 (leave it unset). On nodes with several network interfaces, name the one
# the nodes reach each other on: NCCL_SOCKET_IFNAME (NCCL's bootstrap and socket transport; a prefix,
# or ^prefix to exclude) and GLOO_SOCKET_IFNAME (gloo, megamft's host-side group; exact interface names),
# e.g. NCCL_SOCKET_IFNAME=ib0 GLOO_SOCKET_IFNAME=ib0; NCCL_IB_HCA picks the InfiniBand adapters.
set -euo pipefail
config="$1"; shift
: "${NNODES:=1}" "${NODE_RANK:=0}" "${GPUS_PER_NODE:=8}" "${MASTER_ADDR:=127.0.0.1}" "${MASTER_PORT:=29500}"
world=$((NNODES * GPUS_PER_NODE))
# Fail fast, before any GPU is touched: layout and divisibility checks for this world size.
python -m megamft check --config "$config" --world-size "$world" "$@"
exec python -m megamft launch --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    -m megamft train --config "$config" "$@"
