"""benchmarks/grad_quality.py: its bias / noise split against draws with a known bias and noise, and a
smoke run through the real driver."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import grad_quality

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_metrics_recover_a_known_bias_and_noise():
    g = torch.Generator().manual_seed(0)
    n, k = 200_000, 16
    ref = {"decoder.layers.0.mlp.linear_fc1.weight": torch.randn(n, generator=g, dtype=torch.float64),
           "embedding.word_embeddings.weight": torch.randn(10, generator=g, dtype=torch.float64)}
    name = "decoder.layers.0.mlp.linear_fc1.weight"
    bias = 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    draws = [{name: ref[name] + bias + 0.3 * torch.randn(n, generator=g, dtype=torch.float64),
              "embedding.word_embeddings.weight": ref["embedding.word_embeddings.weight"].clone()} for _ in range(k)]
    m = grad_quality._metrics(ref, draws)["quantized linears"]
    norm = ref[name].norm().item()
    # expected from the construction: noise 0.3 per element, bias 0.1 per element (relative to ~1)
    assert m["noise"] == pytest.approx(0.3 * math.sqrt(n) / norm, rel=0.01)
    assert m["bias"] == pytest.approx(bias.norm().item() / norm, rel=0.02)
    assert m["error_one_draw"] == pytest.approx(math.sqrt(0.09 + 0.01) * math.sqrt(n) / norm, rel=0.01)
    assert m["draws"] == k and 0.9 < m["cosine_one_draw"] < 1.0


@pytest.mark.timeout(300)
def test_smoke_run(tmp_path):
    out = tmp_path / "gq"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.grad_quality", "--out", str(out), "--train-steps", "2",
                           "--draws", "2", "--eval-batches", "1", "--only", "quartet2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.load(open(out / "results.json"))["results"]["quartet2"]
    q = res["quantized linears"]
    assert 0 < q["noise"] < 1 and 0 <= q["bias"] < 1 and q["draws"] == 2
    assert "| quartet2 |" in open(out / "table.md").read()
