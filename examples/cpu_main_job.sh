#!/usr/bin/env bash
# The main job on a CPU machine: small GPT, quartet2, Python stdlib corpus (byte-level).
# Writes runs/cpu_main_job/{corpus,iter_*/,latest_checkpointed_iteration.txt,loss.png,summary.json}
# (RUN_DIR=DIR for another folder). A checkpoint already there is resumed (--load; a finished run has
# nothing left to train); --overwrite starts over.
set -euo pipefail
RUN_DIR=${RUN_DIR:-runs/cpu_main_job}
load=(--load "$RUN_DIR")
for arg in "$@"; do
  if [[ "$arg" == "--overwrite" || "$arg" == "--nvfp4-overwrite" ]]; then load=(); fi
done
python -m megatron_fp4.pretrain_gpt --nvfp4-cpu --nvfp4-recipe quartet2 --save "$RUN_DIR" "${load[@]}" "$@"
