#!/usr/bin/env bash
# TP=2 + sequence parallel: each rank quantizes its own tokens, all-gathers packed FP4 + E4M3 scales.
set -euo pipefail
source "$(dirname "$0")/_model_flags.sh"
torchrun --nproc-per-node 2 -m megatron_fp4.pretrain_gpt \
  "${MODEL_FLAGS[@]}" "${TRAIN_FLAGS[@]}" "${DATA_FLAGS[@]}" "${PLUGIN_FLAGS[@]}" "${SAVE_FLAGS[@]}" \
  --tensor-model-parallel-size 2 --sequence-parallel "$@"
