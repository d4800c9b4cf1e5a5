#!/usr/bin/env bash
# The README's main-job command: set up (or reuse) .venv, then pretrain a small GPT with quartet2 on
# the default corpus (the Python standard library's sources, byte-level tokens) through megatron_fp4's
# Megatron path. On a machine with a GPU it uses the GPU; otherwise the CPU (training < 10 minutes on
# 2 cores). Prints Megatron-style progress lines; writes runs/main_job/{corpus,iter_*/,loss.png,
# summary.json}. Extra arguments go to `python -m megatron_fp4.pretrain_gpt` (e.g. --mfp4-recipe nvidia).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$("$root/scripts/setup_env.sh" | tail -n 1)"
cd "$root"
export PYTHONUNBUFFERED=1
exec "$py" -m megatron_fp4.pretrain_gpt --mfp4-recipe quartet2 --save runs/main_job "$@"
