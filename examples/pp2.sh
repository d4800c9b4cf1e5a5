#!/usr/bin/env bash
# PP=2 with 2 virtual stages per rank (interleaved 1F1B; --num-layers must be a multiple of 4);
# first/last layer kept in BF16.
set -euo pipefail
source "$(dirname "$0")/_model_flags.sh"
torchrun --nproc-per-node 2 -m megatron_fp4.pretrain_gpt \
  "${MODEL_FLAGS[@]}" "${TRAIN_FLAGS[@]}" "${DATA_FLAGS[@]}" "${PLUGIN_FLAGS[@]}" "${SAVE_FLAGS[@]}" \
  --pipeline-model-parallel-size 2 --num-virtual-stages-per-pipeline-rank 2 \
  --first-last-layers-bf16 --num-layers-at-start-in-bf16 1 --num-layers-at-end-in-bf16 1 "$@"
