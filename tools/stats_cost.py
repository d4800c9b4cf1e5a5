"""What one statistics iteration (`--nvfp4-stats-interval`) costs on the GPU, in one process: the four
linears of a ~1B GPT block (hidden 2048, SwiGLU 5632; --hidden, --ffn; T = tokens per micro-batch) forward + backward,
LAYERS times (one "iteration"), with statistics off and on (every operand observed, then collect(),
which reads back once), interleaved, wall time with the GPU synchronised, medians after warm-up.

    python -m tools.stats_cost [--recipes quartet2,nvidia,tetrajet2] [--tokens 4096] [--layers 20]

Prints per recipe: the iteration off and on, the extra time of a statistics iteration, and that extra
over the given step time (--step-ms, e.g. the Megatron step's median) at intervals 1, 10 and 100.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from megatron_fp4 import stats
from megatron_fp4.linear import nvfp4_linear
from megatron_fp4.recipe import QuantContext
from megatron_fp4.registry import load_recipe
from megatron_fp4.rng import derive_key


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--recipes", default="quartet2,nvidia,tetrajet2")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--step-ms", type=float, default=None, help="the training step's time, for the ratios")
    p.add_argument("--cpu", action="store_true", help="a smoke test of the script on CPU (small --tokens)")
    a = p.parse_args()
    if not a.cpu and not torch.cuda.is_available():
        p.error("needs a CUDA GPU (--cpu: a smoke test)")
    dev = "cpu" if a.cpu else "cuda"
    sync = (lambda: None) if a.cpu else torch.cuda.synchronize
    print(f"device {dev if a.cpu else torch.cuda.get_device_name()}; {a.layers} x the ~1B block's 4 linears, T={a.tokens}")
    gen = torch.Generator(device=dev).manual_seed(3)
    for name in a.recipes.split(","):
        rec = load_recipe(name)
        ops = []
        h, f = a.hidden, a.ffn
        for k, n in [(h, 3 * h), (h, h), (h, 2 * f), (f, h)]:      # qkv, o, fc1, fc2
            x = torch.randn(a.tokens, k, device=dev, dtype=torch.bfloat16, generator=gen).requires_grad_(True)
            w = (torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=gen) * 0.02).requires_grad_(True)
            dy = torch.randn(a.tokens, n, device=dev, dtype=torch.bfloat16, generator=gen)
            ops.append((x, w, dy))
        it = [0]

        def iteration(observe: bool) -> float:
            it[0] += 1
            stats.configure(1 if observe else 0)
            stats.on_iteration(it[0])
            sync()
            t0 = time.perf_counter()
            for layer in range(a.layers):
                for i, (x, w, dy) in enumerate(ops):
                    x.grad = w.grad = None
                    key = derive_key(1234, it[0], layer * 4 + i, 0)
                    nvfp4_linear(x, w, None, rec, QuantContext(key=key, seed=rec.seed)).backward(dy)
            if observe:
                records, _ = stats.collect(it[0])
                assert len(records) >= 5     # per (layer name, operand): every call here is "NVFP4Linear"
            sync()
            return (time.perf_counter() - t0) * 1e3

        for observe in (False, True, False, True):      # warm-up: compiles, index tensors
            iteration(observe)
        off, on = [], []
        for _ in range(a.reps):
            off.append(iteration(False))
            on.append(iteration(True))
        stats.configure(0)
        m_off, m_on = statistics.median(off), statistics.median(on)
        extra = m_on - m_off
        line = (f"{name}: iteration off {m_off:.1f} ms, on {m_on:.1f} ms (medians of {a.reps}); "
                f"a statistics iteration costs {extra:+.1f} ms")
        if a.step_ms:
            line += "; over a %.1f ms step: " % a.step_ms + ", ".join(
                f"interval {n} {100 * extra / n / a.step_ms:.2f}%" for n in (1, 10, 100))
        print(line, flush=True)
        del ops
        if not a.cpu:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
