"""Megatron's own CUDA graphs (`--cuda-graph-impl local`) with the plugin spec, on a GPU: the launcher's
GPU route trained eagerly and with graphs gives the same losses at every iteration (the replays draw the
random bits eager execution draws at that step, not the capture step's), for a recipe with stochastic
rounding in every backward GEMM. Control, same test: a run whose random streams differ only by the
recipe seed moves the losses (so the comparison can fail). Megatron's unfused attention, cuBLAS on one
GPU and the plugin's kernels are deterministic, so equality is exact."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.timeout(600)]

ITERS = 8
FLAGS = ["--num-layers", "2", "--hidden-size", "256", "--ffn-hidden-size", "768", "--num-attention-heads", "4",
         "--seq-length", "256", "--max-position-embeddings", "256", "--micro-batch-size", "2",
         "--global-batch-size", "4", "--train-iters", str(ITERS), "--lr", "1e-3", "--lr-warmup-iters", "1", "--log-interval", "1",
         "--eval-iters", "0", "--eval-interval", "100000", "--mock-data", "--tokenizer-type", "NullTokenizer",
         "--vocab-size", "1024", "--nvfp4-attention", "megatron", "--no-check-for-nan-in-loss-and-grad",
         "--hidden-dropout", "0", "--attention-dropout", "0"]   # dropout draws from the CUDA generator, which
# the graphs' warm-up and capture passes advance: without it the losses would differ for that reason alone


def _losses(tmp_path, name, recipe, *extra):
    save = tmp_path / name
    proc = subprocess.run([sys.executable, "-m", "megatron_fp4.pretrain_gpt", *FLAGS, "--nvfp4-recipe", recipe,
                           "--save", str(save), "--save-interval", "100000", *extra], capture_output=True, text=True,
                          timeout=500, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(save / "summary.json") as fh:
        summary = json.load(fh)
    return [v for _, v in summary["losses"]], proc.stdout


@pytest.mark.parametrize("recipe", ["quartet2", "nvidia", "tetrajet2"])
def test_megatron_local_cuda_graphs_replay_fresh_random_bits(tmp_path, recipe):
    eager, _ = _losses(tmp_path, "eager", recipe)
    graphed, out = _losses(tmp_path, "graphed", recipe, "--cuda-graph-impl", "local")
    other, _ = _losses(tmp_path, "other-seed", recipe, "--nvfp4-override", "seed=4321")
    assert len(eager) == len(graphed) == ITERS
    assert graphed == eager, (eager, graphed)
    assert other[1:] != eager[1:], (eager, other)          # the random streams do move the losses
