#!/usr/bin/env bash
# Launch examples. One process (CPU or one GPU):
#   lavin-edge train recipes/demo.toml
# One node, N GPUs (DDP over NCCL; each rank reads its DistributedSampler shard, rank 0 logs and saves):
#   torchrun --nproc-per-node 2 -m lavin_edge.cli train recipes/scienceqa-7b.toml
# Two nodes with 8 GPUs each (run on every node; MASTER is the first node's address):
#   torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint "$MASTER:29500" \
#       -m lavin_edge.cli train recipes/chatbot-13b.toml --accum-steps 1 --batch-size 2
# Resume after Ctrl-C / preemption (same world size and batch): add --resume.
set -euo pipefail
NPROC="${NPROC:-2}"
RECIPE="${1:-recipes/scienceqa-7b.toml}"
shift || true
exec torchrun --nproc-per-node "$NPROC" -m lavin_edge.cli train "$RECIPE" "$@"
