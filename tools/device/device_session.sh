#!/usr/bin/env bash
# One device session's measurements, in stages that each fit one device call (10 minutes):
#
#   bash tools/device/device_session.sh check     # GPU tests + kernel benchmark          (~8 min)
#   bash tools/device/device_session.sh check+multigpu  # GPU tests and the one-rank multi-GPU runs side by
#                                   # side, then the kernel benchmark alone, then the timed TP=1 runs
#   bash tools/device/device_session.sh quality   # the quality runs still missing         (~9.5 min)
#   bash tools/device/device_session.sh quality-seed2  # second seeds of nvidia, tetrajet2, quartet2(-no46)
#   bash tools/device/device_session.sh step      # ~1B Megatron GPT step, bf16 / quartet2 (~5 min)
#   bash tools/device/device_session.sh quality+tests  # quality runs + GPU tests alongside (one call)
#   bash tools/device/device_session.sh step+bench     # ~1B step, then the kernel benchmark (one call)
#   bash tools/device/device_session.sh variants  # leave-one-out kernel variants (BAMAX, FAST_RN, ...)
#   bash tools/device/device_session.sh multigpu-tp|multigpu-curves|multigpu-grads|multigpu-single
#                                   # the multi-GPU issue's runs, one stage per call (runs/multi_gpu stays
#                                   # on the warm machine, so the table grows); on one GPU only the
#                                   # one-rank runs of the stage (--single-gpu)
#
# Every stage writes under $OUT (the device tool returns at most 8 files, 2 levels deep: each stage
# packs its logs into one tarball) and prints its tables last. Run from the repo root with .mcore/
# (megatron-core wheel) and .whl/ (pytest wheels) carried; see tools/device/_device_env.sh.
set -uo pipefail
cd "$(dirname "$0")/../.."
STAGE=${1:?usage: device_session.sh check|check+multigpu|grads+tree|quality|step|quality+tests|step+bench|quality-seed2|variants|multigpu-tp|multigpu-curves|multigpu-grads|multigpu-single}
OUT=${OUT:-device_out}
source tools/device/_device_env.sh
if ! $PY -c "import pytest" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
NAME=${STAGE//+/_}   # file names without '+'
log=$OUT/$NAME
mkdir -p "$log"

gpu_tests() {   # $1: time limit in seconds
  # kernels written or changed since the last device run are only interpreter-verified: their GPU
  # tests (bit-exactness against the torch twins on the GPU)
  MEGATRON_FP4_TEST_GPU=1 timeout "$1" $PY -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_device_consistency.py tests/kernels 2>&1 | tail -40 > "$log/gpu_tests.txt"
}
bench() {       # $1: time limit; sections are saved as they finish, so a cut-short run keeps them
  timeout "$1" $PY -m benchmarks.bench_kernels --out "$log/bench" 2>&1 | tail -150 > "$log/bench_stdout.txt"
  cp "$log/bench/results.md" "$OUT/bench_kernels.md" 2>/dev/null
}
quality() {     # $1: time limit for the command, $2 per run
  # --import-summaries: start from the committed results; only runs missing or cut short train.
  # runs/quality_device stays on a warm machine: the next call resumes cut-short runs from their
  # checkpoints. Only summaries and logs come back (checkpoints are ~40 MB a run).
  # QUALITY_RUNS: the three runs cut short in the first device session, and the second seed of
  # quartet2 and quartet2-no46 (is no46's 2.7x gap a property of the recipe or of one seed / of the
  # kernels of 2026-11-23?); the host-bound small models share the GPU
  local q=runs/quality_device
  local runs=${QUALITY_RUNS:-nvidia tetrajet2-full quartet2-plus quartet2-no46-seed2 quartet2-seed2}
  timeout "$1" $PY -m benchmarks.quality --out $q --import-summaries docs/quality --only $runs \
    --parallel $(echo $runs | wc -w) --timeout "$2" 2>&1 | tail -80 > "$log/quality_stdout.txt"
  cp $q/table.md "$OUT/quality_table.md" 2>/dev/null
  cp $q/gap.png "$OUT/gap.png" 2>/dev/null
  for d in $q/*/; do
    n=$(basename "$d"); [ "$n" = corpus ] && continue
    mkdir -p "$log/q/$n"; cp "$d"summary.json "$d"log.txt "$log/q/$n/" 2>/dev/null
  done
}
step() {        # the ~1B Megatron GPT step, bf16 then quartet2
  OUT=$log/g1b LAYERS=20 HIDDEN=2048 FFN=5632 HEADS=16 STEPS=30 BF16_TIMEOUT=${BF16_TIMEOUT:-130} \
    RUN_TIMEOUT=${RUN_TIMEOUT:-150} bash tools/device/gpu_check.sh 2>&1 | tail -40 > "$log/step_stdout.txt"
}

multigpu() {     # $1: time limit for the command, $2: file for its output, then multi_gpu.py's flags
  local limit=$1 file=$2; shift 2
  timeout "$limit" $PY -m benchmarks.multi_gpu --out runs/multi_gpu "$@" 2>&1 | tail -80 > "$log/$file"
}
multigpu_shared() {   # $1: time limit, $2: stages; their one-rank runs side by side on the one GPU
  multigpu "$1" multi_gpu_shared_stdout.txt --stage "$2" --share-gpu --single-gpu --timeout $(( $1 - 10 ))
}
collect_multigpu() {  # the table and every run's summary and log (small) so far
  cp runs/multi_gpu/table.md "$OUT/multi_gpu_table.md" 2>/dev/null
  for d in runs/multi_gpu/*/; do
    n=$(basename "$d"); { [ -d "$d" ] && [ "$n" != corpus ]; } || continue
    mkdir -p "$log/mg/$n"; cp "$d"summary.json "$d"log.txt "$log/mg/$n/" 2>/dev/null
  done
}

case "$STAGE" in
  check)   gpu_tests 240; bench 330; cat "$log/gpu_tests.txt" "$log/bench_stdout.txt" | tail -60 ;;
  check+multigpu)
    # everything one call can hold when calls are scarce: what takes no timings shares the GPU first
    # (the GPU tests and the one-rank curves/grads runs of the multi-GPU command), then the kernel
    # benchmark alone (~70 s on the H200), then the timed TP=1 runs in the time left
    gpu_tests 300 & tests_pid=$!
    multigpu_shared 300 curves,grads
    wait $tests_pid
    bench $(( 470 - SECONDS ))
    multigpu $(( 590 - SECONDS )) multi_gpu_stdout.txt --stage tp --single-gpu --timeout 100
    collect_multigpu
    cat "$log/gpu_tests.txt" | tail -8; tail -45 "$log/bench_stdout.txt"; tail -12 "$log/multi_gpu_shared_stdout.txt"
    tail -12 "$log/multi_gpu_stdout.txt" ;;
  quality) quality 585 555; cat "$log/quality_stdout.txt" ;;
  step)    step; cat "$log/step_stdout.txt" ;;
  quality+tests)
    # one call for two things that share a GPU without disturbing each other's results: the quality
    # runs (small models, host-bound) and the GPU correctness tests (no timings) in the background
    gpu_tests 300 & tests_pid=$!
    quality 585 555
    wait $tests_pid
    cat "$log/gpu_tests.txt"; cat "$log/quality_stdout.txt" ;;
  step+bench)
    # timings, so one after the other: the ~1B step first (bounded), then the kernel benchmark in
    # the time left (its headline sections come first and are saved as they finish)
    BF16_TIMEOUT=110 RUN_TIMEOUT=140 step
    bench $(( 585 - SECONDS ))   # SECONDS: since this script started
    cat "$log/step_stdout.txt"; tail -60 "$log/bench_stdout.txt" ;;
  quality-seed2)
    # each gap's own seed-to-seed variation (paired with bf16-seed2 from docs/quality)
    QUALITY_RUNS=${QUALITY_RUNS:-nvidia-seed2 tetrajet2-seed2 quartet2-no46-seed2 quartet2-seed2} quality 585 555
    cat "$log/quality_stdout.txt" ;;
  variants)
    # each default against its slower alternative in one run (same bits required: "vs default" column)
    timeout 560 $PY -m tools.bench_variants --out "$log/var" 2>&1 | tail -120 | tee "$log/variants_stdout.txt"
    ;;
  grads+tree)
    # short: the one-rank gradient runs side by side, then the fixed-order EDEN sums' cost
    multigpu_shared 300 grads
    tail -40 "$log/multi_gpu_shared_stdout.txt"
    collect_multigpu
    VARIANTS_ONLY=tree timeout $(( 590 - SECONDS )) $PY -m tools.bench_variants --out "$log/var" 2>&1 \
      | tail -30 | tee "$log/variants_stdout.txt" ;;
  multigpu-tp|multigpu-curves|multigpu-grads|multigpu-single)
    # on a one-GPU machine: the one-rank runs of the stage (references, controls); the rest later.
    # multigpu-single: every one-rank run of the three stages in one call: curves and grads side by
    # side on the one GPU (losses and gradients only), then the timed TP=1 runs alone
    single=$([ "$(nvidia-smi -L | wc -l)" -lt 2 ] && echo --single-gpu)
    if [ "$STAGE" = multigpu-single ]; then
      multigpu_shared 330 curves,grads
      tail -25 "$log/multi_gpu_shared_stdout.txt"
      multigpu $(( 590 - SECONDS )) multi_gpu_stdout.txt --stage tp --single-gpu --timeout 240
    else
      multigpu 590 multi_gpu_stdout.txt --stage "${STAGE#multigpu-}" --timeout 420 $single
    fi
    tail -80 "$log/multi_gpu_stdout.txt"
    collect_multigpu
    ;;
  *)
    echo "unknown stage $STAGE"; exit 2 ;;
esac
tar -czf "$OUT/$NAME.tar.gz" -C "$OUT" "$NAME" && rm -rf "$log"
ls -la "$OUT"
