#!/usr/bin/env bash
# Issue 4 GPU run: `python -m megatron_fp4.pretrain_gpt` (GPU route = megatron.training.pretrain) on a
# small GPT (6 x 512, SwiGLU ffn 2048, 8 heads, seq 1024, byte-level vocab 256) trained on the default
# corpus (the Python standard library's sources on the machine, held-out whole files), STEPS (120) steps
# each of tetrajet2-full and quartet2-plus with a compressed stabilizer schedule: OutControl records input
# column norms at iterations 10-14 and selects at 15; OsciReset windows of 8 updates start every 20
# updates from update 40 (resets at 49, 69, 89, 109). Prints, per run, the fraction of weights reset
# per reset event and the share of input norm held by the outlier channels; writes $OUT/<recipe>.{log,json}.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-stabilizers_out}
STEPS=${STEPS:-120}
source tools/device/_device_env.sh

FLAGS=(
  --num-layers 6 --hidden-size 512 --ffn-hidden-size 2048 --num-attention-heads 8
  --seq-length 1024 --max-position-embeddings 1024 --position-embedding-type rope --swiglu
  --normalization RMSNorm --untie-embeddings-and-output-weights --disable-bias-linear
  --micro-batch-size 4 --global-batch-size 4 --train-iters "$STEPS"
  --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 20 --lr-decay-style cosine --clip-grad 1.0 --weight-decay 0.1
  --tokenizer-type NullTokenizer --bf16 --transformer-impl local
  --log-interval 10 --eval-iters 0 --eval-interval 100000 --seed 1234
  --nvfp4-override outcontrol_record_start=10 --nvfp4-override outcontrol_record_iters=5
  --nvfp4-override oscireset_start=40 --nvfp4-override oscireset_period=20 --nvfp4-override oscireset_window=8
)
for RECIPE in tetrajet2-full quartet2-plus; do
  echo "=== $RECIPE ==="
  timeout "${RUN_TIMEOUT:-200}" $PY -m megatron_fp4.pretrain_gpt "${FLAGS[@]}" --nvfp4-recipe "$RECIPE" \
    --save "/tmp/stab_$RECIPE" --nvfp4-summary "/tmp/stab_$RECIPE/summary.json" > "$OUT/$RECIPE.log" 2>&1
  echo "exit $?"
  cp "/tmp/stab_$RECIPE/summary.json" "$OUT/$RECIPE.json" 2>/dev/null
  grep -E "iteration +[0-9]+/|Error|Traceback|built corpus" "$OUT/$RECIPE.log" | tail -8
  ls /tmp/stab_$RECIPE/iter_* 2>/dev/null | grep -c nvfp4_oscireset | sed 's/^/osci state files in checkpoint: /'
done
$PY - "$OUT" <<'PY'
import json, os, statistics, sys
out = sys.argv[1]
for recipe in ("tetrajet2-full", "quartet2-plus"):
    path = os.path.join(out, f"{recipe}.json")
    if not os.path.exists(path):
        print(recipe, "no summary"); continue
    d = json.load(open(path))
    print(f"## {recipe}: {d['iterations']} iterations, final loss {d['losses'][-1][1]:.4f}, "
          f"median step {1000 * (d['median_step_s'] or 0):.1f} ms, device {d['device']}")
    by_update = {}
    for e in d["oscireset_events"]:
        by_update.setdefault(e["update"], []).append(e)
    print("| reset at update | layers | elements reset | fraction of managed weights | max layer fraction | median ratio (median over layers) |")
    print("|---|---|---|---|---|---|")
    for u, es in sorted(by_update.items()):
        reset, numel = sum(e["reset"] for e in es), sum(e["numel"] for e in es)
        print(f"| {u} | {len(es)} | {reset} | {reset / numel:.3e} | {max(e['reset_fraction'] for e in es):.3e} | "
              f"{statistics.median(e['median_ratio'] for e in es):.3f} |")
    oc = d["outcontrol"]
    if oc:
        shares = [v["norm_share"] for v in oc.values()]
        print(f"OutControl: {len(oc)} layers, outliers {sum(v['outliers'] for v in oc.values())} of "
              f"{sum(v['channels'] for v in oc.values())} input channels; share of recorded input norm: "
              f"mean {statistics.mean(shares):.3f}, min {min(shares):.3f}, max {max(shares):.3f}")
        for name, v in sorted(oc.items()):
            print(f"  {name}: {v['outliers']}/{v['channels']} channels hold {100 * v['norm_share']:.1f}% of the norm")
PY
