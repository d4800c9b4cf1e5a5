#!/usr/bin/env bash
# The README's main-job command: set up (or reuse) .venv, then pretrain a small GPT with quartet2 on
# the default corpus (the Python standard library's sources, byte-level tokens) through megatron_fp4's
# Megatron path. On a machine with a GPU it uses the GPU; otherwise the CPU (about 7 minutes of
# training on 2 idle cores). Prints Megatron-style progress lines; writes runs/main_job/{corpus,
# iter_*/,latest_checkpointed_iteration.txt,loss.png,summary.json} (RUN_DIR=DIR for another folder).
#
# Time budget: this script sets --nvfp4-time-budget 540 (9 minutes), so that one command stays under
# 10 minutes on a slow or busy machine. A run the budget stops saves a checkpoint, prints "stopped by
# time budget at iteration N of 300 ...; resume with --load ..." and exits with status 3; running this
# script again continues it (it passes --load: an existing checkpoint is resumed, a finished run has
# nothing left to train). Override with a later flag, e.g. `--nvfp4-time-budget 1e9`; `--overwrite`
# instead of resuming starts over. Extra arguments go to `python -m megatron_fp4.pretrain_gpt`
# (e.g. --nvfp4-recipe nvidia, with another RUN_DIR: a checkpoint of another recipe is not resumed).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$("$root/scripts/setup_env.sh" | tail -n 1)"
cd "$root"
export PYTHONUNBUFFERED=1
run_dir="${RUN_DIR:-runs/main_job}"
load=(--load "$run_dir")
for arg in "$@"; do
  if [[ "$arg" == "--overwrite" || "$arg" == "--nvfp4-overwrite" ]]; then load=(); fi   # start over, not resume
done
echo "main_job.sh: run folder $run_dir; time budget 540 s (--nvfp4-time-budget; a stopped run continues on the next command)"
exec "$py" -m megatron_fp4.pretrain_gpt --nvfp4-recipe quartet2 --save "$run_dir" "${load[@]}" \
  --nvfp4-time-budget 540 "$@"
