#!/usr/bin/env bash
# One device call: the ~1B Megatron GPT step (GPU route, mock data, seq 2048, micro-batch 2, vocab 32000)
# for bf16 and quartet2 with Megatron's unfused core attention and with the plugin's SDPA attention,
# optionally with Megatron's CUDA graphs (SETTINGS="megatron sdpa sdpa+graphs"), then (TESTS=1) the GPU tests.
#   OUT=... bash tools/device/device_step.sh      (run from the repo root; .mcore/ carried)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-device_out}
source tools/device/_device_env.sh
STEPS=${STEPS:-25}
SETTINGS=${SETTINGS:-"megatron sdpa"}
RECIPES=${RECIPES:-"bf16 quartet2"}
FLAGS=(--num-layers 20 --hidden-size 2048 --ffn-hidden-size 5632 --num-attention-heads 16
  --seq-length 2048 --max-position-embeddings 2048 --position-embedding-type rope --swiglu
  --normalization RMSNorm --untie-embeddings-and-output-weights --disable-bias-linear
  --micro-batch-size 2 --global-batch-size 2 --train-iters "$STEPS"
  --lr 6e-4 --min-lr 6e-5 --lr-warmup-iters 5 --lr-decay-style cosine --clip-grad 1.0 --weight-decay 0.1
  --mock-data --tokenizer-type NullTokenizer --vocab-size 32000 --bf16 --transformer-impl local
  --log-interval 5 --eval-iters 0 --eval-interval 100000 --seed 1234)
for setting in $SETTINGS; do
  for r in $RECIPES; do
    extra=(--nvfp4-attention "${setting%%+*}")
    case "$setting" in *+graphs) extra+=(--cuda-graph-impl local --no-check-for-nan-in-loss-and-grad);; esac
    extra+=(${EXTRA:-})                  # more launcher flags (e.g. EXTRA="--nvfp4-stats-interval 1" TAG=-stats1)
    name="${setting//+/_}-$r${TAG:-}"
    timeout ${RUN_TIMEOUT:-150} $PY -m megatron_fp4.pretrain_gpt "${FLAGS[@]}" "${extra[@]}" --nvfp4-recipe "$r" \
      --nvfp4-summary "$OUT/$name.json" > "$OUT/$name.log" 2>&1
    echo "$name exit $?"; grep -E "Error|error:|Traceback" "$OUT/$name.log" | head -3
  done
done
if [ "${TESTS:-0}" = 1 ]; then
  MEGATRON_FP4_TEST_GPU=1 timeout ${TEST_TIMEOUT:-240} $PY -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_device_consistency.py tests/kernels tests/megatron/test_attention.py > "$OUT/gpu_tests.txt" 2>&1
  tail -5 "$OUT/gpu_tests.txt"
fi
$PY - "$OUT" <<'PY'
import json, os, sys, glob
out = sys.argv[1]
rows = {}
for f in sorted(glob.glob(os.path.join(out, "*.json"))):
    d = json.load(open(f)); rows[os.path.basename(f)[:-5]] = d
for n, d in rows.items():
    print(f"{n}: median step {1000*(d.get('median_step_s') or float('nan')):.1f} ms, peak {d.get('peak_mem_gib', float('nan')):.2f} GiB, "
          f"{d.get('tokens_per_s', 0):.0f} tok/s, device {d.get('device')}")
PY
