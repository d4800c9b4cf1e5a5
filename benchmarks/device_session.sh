#!/usr/bin/env bash
# One device session's measurements, in stages that each fit one device call (10 minutes):
#
#   bash benchmarks/device_session.sh check     # GPU tests + kernel benchmark          (~8 min)
#   bash benchmarks/device_session.sh quality   # the quality runs still missing         (~9.5 min)
#   bash benchmarks/device_session.sh quality-seed2  # second seeds of nvidia, tetrajet2, quartet2(-no46)
#   bash benchmarks/device_session.sh step      # ~1B Megatron GPT step, bf16 / quartet2 (~5 min)
#   bash benchmarks/device_session.sh variants  # leave-one-out kernel variants (BAMAX, FAST_RN, ...)
#   bash benchmarks/device_session.sh multigpu-tp|multigpu-curves|multigpu-grads
#                                   # the multi-GPU issue's runs, one stage per call (runs/multi_gpu stays
#                                   # on the warm machine, so the table grows); on one GPU only the
#                                   # one-rank runs of the stage (--single-gpu)
#
# Every stage writes under $OUT (the device tool returns at most 8 files, 2 levels deep: each stage
# packs its logs into one tarball) and prints its tables last. Run from the repo root with .mcore/
# (megatron-core wheel) and .whl/ (pytest wheels) carried; see benchmarks/_device_env.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:?usage: device_session.sh check|quality|quality-seed2|step|variants|multigpu-tp|multigpu-curves|multigpu-grads}
OUT=${OUT:-device_out}
source benchmarks/_device_env.sh
if ! $PY -c "import pytest" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
log=$OUT/$STAGE
mkdir -p "$log"
case "$STAGE" in
  check)
    # kernels written or changed since the last device run are only interpreter-verified: their GPU
    # tests first (bit-exactness against the torch twins on the GPU), then the timing tables
    MEGATRON_FP4_TEST_GPU=1 timeout 240 $PY -m pytest -q -m gpu -p no:cacheprovider \
      tests/test_device_consistency.py tests/kernels 2>&1 | tail -40 | tee "$log/gpu_tests.txt"
    timeout 330 $PY benchmarks/bench_kernels.py --out "$log/bench" 2>&1 | tail -150 > "$log/bench_stdout.txt"
    cp "$log/bench/results.md" "$OUT/bench_kernels.md" 2>/dev/null
    ;;
  quality)
    # --import-summaries: start from the committed results; only runs missing or cut short train
    timeout 585 $PY benchmarks/quality.py --out "$log/q" --import-summaries docs/quality --parallel 3 \
      --timeout 555 2>&1 | tail -80 | tee "$log/quality_stdout.txt"
    cp "$log/q/table.md" "$OUT/quality_table.md" 2>/dev/null
    cp "$log/q/gap.png" "$OUT/gap.png" 2>/dev/null
    ;;
  quality-seed2)
    # each gap's own seed-to-seed variation (paired with bf16-seed2 from docs/quality)
    timeout 580 $PY benchmarks/quality.py --out "$log/q" --import-summaries docs/quality --parallel 4 \
      --timeout 540 --only nvidia-seed2 tetrajet2-seed2 quartet2-no46-seed2 quartet2-seed2 \
      2>&1 | tail -80 | tee "$log/quality_stdout.txt"
    cp "$log/q/table.md" "$OUT/quality_seed2_table.md" 2>/dev/null
    ;;
  step)
    OUT=$log/g1b LAYERS=20 HIDDEN=2048 FFN=5632 HEADS=16 STEPS=30 BF16_TIMEOUT=130 RUN_TIMEOUT=150 \
      bash benchmarks/gpu_check.sh 2>&1 | tail -40 | tee "$log/step_stdout.txt"
    ;;
  variants)
    # each default against its slower alternative in one run (same bits required: "vs default" column)
    timeout 560 $PY benchmarks/bench_variants.py --out "$log/var" 2>&1 | tail -120 | tee "$log/variants_stdout.txt"
    ;;
  multigpu-tp|multigpu-curves|multigpu-grads)
    # on a one-GPU machine: the one-rank runs of the stage (references, controls); the rest later
    single=$([ "$(nvidia-smi -L | wc -l)" -lt 2 ] && echo --single-gpu)
    timeout 590 $PY benchmarks/multi_gpu.py --out runs/multi_gpu --stage "${STAGE#multigpu-}" --timeout 420 $single \
      2>&1 | tail -80 | tee "$log/multi_gpu_stdout.txt"
    cp runs/multi_gpu/table.md "$OUT/multi_gpu_table.md" 2>/dev/null
    for d in runs/multi_gpu/*/; do   # summaries and logs of every run so far (small)
      n=$(basename "$d"); mkdir -p "$log/$n"; cp "$d"summary.json "$d"log.txt "$log/$n/" 2>/dev/null
    done
    ;;
  *)
    echo "unknown stage $STAGE (check|quality|step|variants|multigpu-*)"; exit 2 ;;
esac
tar -czf "$OUT/$STAGE.tar.gz" -C "$OUT" "$STAGE" && rm -rf "$log"
ls -la "$OUT"
