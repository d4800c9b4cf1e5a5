#!/usr/bin/env bash
# One device call for issue #19's statistics cost: the GPU tests of the statistics kernel and rows,
# tools.stats_cost (a statistics iteration of the ~1B model's linears, in one process), then the ~1B
# Megatron GPT step (SDPA, quartet2, eager, every iteration logged) with statistics off and every 10
# iterations; prints the mean step over the same iterations of both runs and their ratio.
#   OUT=... bash tools/device/stats_gpu.sh      (run from the repo root; .mcore/ carried)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-device_out}
source tools/device/_device_env.sh
MEGATRON_FP4_TEST_GPU=1 timeout ${TEST_TIMEOUT:-240} $PY -m pytest -q -m gpu -p no:cacheprovider \
  ${GPU_TESTS:-tests/kernels/test_stats_kernel.py tests/test_stats.py tests/kernels/test_double_block.py \
  tests/kernels/test_eden.py tests/test_device_consistency.py} > "$OUT/gpu_tests.txt" 2>&1
tail -3 "$OUT/gpu_tests.txt"
timeout 240 $PY -m tools.stats_cost --reps ${REPS:-5} --recipes ${COST_RECIPES:-quartet2,nvidia,tetrajet2} 2>&1 | tee "$OUT/stats_cost.txt"
timeout 120 $PY tools/device/launch_cost.py 2>&1 | tee "$OUT/launch_cost.txt"
STEPS=${STEPS:-45}
for interval in ${INTERVALS:-0 10}; do
  flag=""; [ "$interval" != 0 ] && flag="--nvfp4-stats-interval $interval"    # off: the flag left out
  OUT=$OUT/step STEPS=$STEPS SETTINGS=sdpa RECIPES=quartet2 TAG=-stats$interval RUN_TIMEOUT=200 \
    EXTRA="$flag --log-interval 1" bash tools/device/device_step.sh | tail -3
done
$PY - "$OUT/step" "$STEPS" <<'PY'
import os, re, statistics, sys
out, steps = sys.argv[1], int(sys.argv[2])
first, last = 12, steps - 4            # whole decades of iterations after warm-up: 12..41 for 45 steps
mean = {}
for interval in (0, 10):
    path = f"{out}/sdpa-quartet2-stats{interval}.log"
    if not os.path.exists(path):
        continue
    times = {}
    for line in open(path):
        m = re.search(r"iteration\s+(\d+)/\s*\d+.*?elapsed time per iteration \(ms\): ([\d.]+)", line)
        if m:
            times[int(m.group(1))] = float(m.group(2))
    window = [times[i] for i in range(first, last + 1) if i in times]
    if not window:
        print(f"interval {interval}: no logged iterations in {first}..{last}")
        continue
    mean[interval] = statistics.mean(window)
    print(f"interval {interval}: mean step {mean[interval]:.1f} ms over iterations {first}..{last} ({len(window)}), "
          f"median {statistics.median(window):.1f} ms; statistics iterations: "
          + ", ".join(f"{i}: {times.get(i, float('nan')):.1f}" for i in range(first, last + 1) if i % 10 == 0))
if len(mean) == 2:
    print(f"statistics every 10 iterations cost {100 * (mean[10] / mean[0] - 1):+.2f}% of the mean step")
PY
if [ "${PROFILE:-0}" = 1 ]; then
  timeout 150 $PY tools/device/stats_profile.py quartet2 > "$OUT/profile.txt" 2>&1; head -45 "$OUT/profile.txt"
fi
