#!/usr/bin/env bash
# GPU step check: `python -m megatron_fp4.pretrain_gpt` (GPU route = megatron.training.pretrain) on a
# GPT (RoPE, RMSNorm, SwiGLU, untied, no biases, byte-level vocab 256), seq 2048, mock data: STEPS
# steps of each recipe in RECIPES (default bf16, then quartet2), in one command.
# Default model: the issue-3 check, ~113M parameters (12 x 768, ffn 3072, 12 heads). The kernels
# issue's ~1B step: LAYERS=20 HIDDEN=2048 FFN=5632 HEADS=16 (1.03B non-embedding parameters).
# Writes $OUT/<recipe>.{log,json,png} and prints a comparison table last.
#
# On the lent device (no network, no megatron-core): the megatron-core 0.19.2 wheel is carried in
# .mcore/ (pip download --no-deps megatron-core==0.19.2 -d .mcore) and installed --no-deps here.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu_check_out}
STEPS=${STEPS:-100}
MBS=${MBS:-2}
LAYERS=${LAYERS:-12} HIDDEN=${HIDDEN:-768} FFN=${FFN:-3072} HEADS=${HEADS:-12}
export RECIPES=${RECIPES:-bf16 quartet2}
source tools/device/_device_env.sh

FLAGS=(
  --num-layers "$LAYERS" --hidden-size "$HIDDEN" --ffn-hidden-size "$FFN" --num-attention-heads "$HEADS"
  --seq-length 2048 --max-position-embeddings 2048 --position-embedding-type rope --swiglu
  --normalization RMSNorm --untie-embeddings-and-output-weights --disable-bias-linear
  --micro-batch-size "$MBS" --global-batch-size "$MBS" --train-iters "$STEPS"
  --lr 6e-4 --min-lr 6e-5 --lr-warmup-iters 10 --lr-decay-style cosine --clip-grad 1.0 --weight-decay 0.1
  --mock-data --tokenizer-type NullTokenizer --vocab-size 256 --bf16 --transformer-impl local
  --log-interval 10 --eval-iters 0 --eval-interval 100000 --seed 1234
)
echo "model: $LAYERS layers x hidden $HIDDEN, ffn $FFN: $(( LAYERS * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * FFN) )) non-embedding parameters"
for RECIPE in $RECIPES; do
  echo "=== $RECIPE ===" 
  timeout "$([ $RECIPE = bf16 ] && echo ${BF16_TIMEOUT:-120} || echo ${RUN_TIMEOUT:-170})" $PY -m megatron_fp4.pretrain_gpt "${FLAGS[@]}" --nvfp4-recipe "$RECIPE" \
    --nvfp4-summary "$OUT/$RECIPE.json" > "$OUT/$RECIPE.log" 2>&1
  echo "exit $?"
  grep -E "iteration +[0-9]+/|Error|error|Traceback" "$OUT/$RECIPE.log" | grep -v "^ *warn" | tail -14
done
$PY - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
s = {r: json.load(open(os.path.join(out, f"{r}.json"))) for r in os.environ.get("RECIPES", "bf16 quartet2").split()
     if os.path.exists(os.path.join(out, f"{r}.json"))}
for r, d in s.items():
    curve = {it: l for it, l in d["losses"]}
    print(r, "loss every 10:", " ".join(f"{it}:{curve[it]:.4f}" for it in sorted(curve) if it % 10 == 0 or it == 1))
    if not d.get("median_step_s"):
        print(r, "too few iterations for a step time"); continue
    print(r, f"median step {d['median_step_s']*1000:.1f} ms (after the first 10 iterations), "
             f"peak mem {d['peak_mem_gib']:.2f} GiB, {d.get('tokens_per_s', 0):.0f} tok/s, device {d['device']}")
b = s.get("bf16")
for r, q in s.items():
    if r != "bf16" and b and b.get("median_step_s") and q.get("median_step_s"):
        print(f"ratio {r}/bf16: step time {q['median_step_s']/b['median_step_s']:.2f}x, "
              f"peak memory {q['peak_mem_gib']/b['peak_mem_gib']:.2f}x, final loss {q['losses'][-1][1]:.4f} vs {b['losses'][-1][1]:.4f}")
PY
