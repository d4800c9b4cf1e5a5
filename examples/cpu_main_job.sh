#!/usr/bin/env bash
# The main job on a CPU machine: small GPT, quartet2, Python stdlib corpus (byte-level), <10 min.
# Writes mfp4_run/{corpus,iter_*/,loss.png,summary.json}.
set -euo pipefail
python -m megatron_fp4.pretrain_gpt --mfp4-cpu --mfp4-recipe quartet2 --save mfp4_run "$@"
