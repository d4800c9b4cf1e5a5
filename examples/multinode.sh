#!/usr/bin/env bash
# Multi-node: run on every node with NODE_RANK set; 8 GPUs per node, TP=2+SP inside a node, DP across.
set -euo pipefail
source "$(dirname "$0")/_model_flags.sh"
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "${GPUS_PER_NODE:-8}" \
  --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}" -m megatron_fp4.pretrain_gpt \
  "${MODEL_FLAGS[@]}" "${TRAIN_FLAGS[@]}" "${DATA_FLAGS[@]}" "${PLUGIN_FLAGS[@]}" "${SAVE_FLAGS[@]}" \
  --tensor-model-parallel-size 2 --sequence-parallel --use-distributed-optimizer \
  --overlap-grad-reduce --overlap-param-gather "$@"
