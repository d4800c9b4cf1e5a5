#!/usr/bin/env bash
# Issue 3 "GPU check": `python -m megatron_fp4.pretrain_gpt` (GPU route = megatron.training.pretrain)
# on a ~113M-parameter GPT (12 x 768, SwiGLU ffn 3072, 12 heads, RoPE, RMSNorm, untied, no biases,
# byte-level vocab 256), seq 2048, mock data: STEPS steps of bf16, then of quartet2, in one command.
# Writes $OUT/{bf16,quartet2}.{log,json,png} and prints a comparison table last.
#
# On the lent device (no network, no megatron-core): the megatron-core 0.19.2 wheel is carried in
# .mcore/ (pip download --no-deps megatron-core==0.19.2 -d .mcore) and installed --no-deps here.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
STEPS=${STEPS:-100}
MBS=${MBS:-2}
source benchmarks/_device_env.sh

FLAGS=(
  --num-layers 12 --hidden-size 768 --ffn-hidden-size 3072 --num-attention-heads 12
  --seq-length 2048 --max-position-embeddings 2048 --position-embedding-type rope --swiglu
  --normalization RMSNorm --untie-embeddings-and-output-weights --disable-bias-linear
  --micro-batch-size "$MBS" --global-batch-size "$MBS" --train-iters "$STEPS"
  --lr 6e-4 --min-lr 6e-5 --lr-warmup-iters 10 --lr-decay-style cosine --clip-grad 1.0 --weight-decay 0.1
  --mock-data --tokenizer-type NullTokenizer --vocab-size 256 --bf16 --transformer-impl local
  --log-interval 10 --eval-iters 0 --eval-interval 100000 --seed 1234
)
for RECIPE in bf16 quartet2; do
  echo "=== $RECIPE ===" 
  timeout "$([ $RECIPE = bf16 ] && echo ${BF16_TIMEOUT:-120} || echo ${RUN_TIMEOUT:-170})" $PY -m megatron_fp4.pretrain_gpt "${FLAGS[@]}" --mfp4-recipe "$RECIPE" \
    --mfp4-summary "$OUT/$RECIPE.json" > "$OUT/$RECIPE.log" 2>&1
  echo "exit $?"
  grep -E "iteration +[0-9]+/|Error|error|Traceback" "$OUT/$RECIPE.log" | grep -v "^ *warn" | tail -14
done
$PY - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
s = {r: json.load(open(os.path.join(out, f"{r}.json"))) for r in ("bf16", "quartet2")
     if os.path.exists(os.path.join(out, f"{r}.json"))}
for r, d in s.items():
    curve = {it: l for it, l in d["losses"]}
    print(r, "loss every 10:", " ".join(f"{it}:{curve[it]:.4f}" for it in sorted(curve) if it % 10 == 0 or it == 1))
    if not d.get("median_step_s"):
        print(r, "too few iterations for a step time"); continue
    print(r, f"median step {d['median_step_s']*1000:.1f} ms (after {d['warmup_excluded']} warm-up), "
             f"peak mem {d['peak_mem_gib']:.2f} GiB, {d.get('tokens_per_s', 0):.0f} tok/s, device {d['device']}")
if len(s) == 2 and all(d.get("median_step_s") for d in s.values()):
    b, q = s["bf16"], s["quartet2"]
    print(f"ratio quartet2/bf16: step time {q['median_step_s']/b['median_step_s']:.2f}x, "
          f"peak memory {q['peak_mem_gib']/b['peak_mem_gib']:.2f}x, final loss {q['losses'][-1][1]:.4f} vs {b['losses'][-1][1]:.4f}")
PY
