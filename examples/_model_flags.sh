# Shared model/training flags (~100M parameters, seq 2048). Sourced by the launch scripts.
RECIPE=${RECIPE:-quartet2}
MODEL_FLAGS=(
  --num-layers 12 --hidden-size 768 --ffn-hidden-size 3072 --num-attention-heads 12
  --seq-length 2048 --max-position-embeddings 2048 --position-embedding-type rope
  --normalization RMSNorm --swiglu --untie-embeddings-and-output-weights --disable-bias-linear
  --transformer-impl local --bf16
)
TRAIN_FLAGS=(
  --micro-batch-size 4 --global-batch-size 32 --train-iters 100 --lr 3e-4 --min-lr 3e-5
  --lr-warmup-iters 10 --lr-decay-style cosine --clip-grad 1.0 --weight-decay 0.1
  --log-interval 10 --eval-interval 50 --eval-iters 5
)
DATA_FLAGS=(--mock-data --tokenizer-type NullTokenizer --vocab-size 32000)
PLUGIN_FLAGS=(--nvfp4-recipe "$RECIPE")
export CUDA_DEVICE_MAX_CONNECTIONS=1
# Each launch script writes into a run folder of its own (checkpoint, summary.json, loss.png):
# runs/<script name>. RUN_DIR=DIR picks another; RUN_DIR= (empty) passes no --save (no checkpoint).
# A folder that already holds a checkpoint is refused: add --load DIR to resume it, --overwrite to
# start over.
RUN_DIR=${RUN_DIR-runs/$(basename "${BASH_SOURCE[1]:-$0}" .sh)}
SAVE_FLAGS=()
if [[ -n "$RUN_DIR" ]]; then SAVE_FLAGS=(--save "$RUN_DIR"); fi
