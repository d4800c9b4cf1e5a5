#!/usr/bin/env bash
set -euo pipefail
source "$(dirname "$0")/_model_flags.sh"
torchrun --nproc-per-node 1 -m megatron_fp4.pretrain_gpt \
  "${MODEL_FLAGS[@]}" "${TRAIN_FLAGS[@]}" "${DATA_FLAGS[@]}" "${PLUGIN_FLAGS[@]}" "${SAVE_FLAGS[@]}" "$@"
