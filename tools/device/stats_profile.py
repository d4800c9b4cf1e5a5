"""Where a statistics iteration's host time goes (issue #19): cProfile of one observed iteration of the
~1B block's four linears x LAYERS (as tools.stats_cost), after warm-up; prints the top functions by
own time and the split between the linears' calls and collect()."""
import cProfile
import pstats
import sys
import time

import torch

from megatron_fp4 import stats
from megatron_fp4.linear import nvfp4_linear
from megatron_fp4.recipe import QuantContext
from megatron_fp4.registry import load_recipe
from megatron_fp4.rng import derive_key

rec = load_recipe(sys.argv[1] if len(sys.argv) > 1 else "quartet2")
T, h, f, layers = 4096, 2048, 5632, 20
gen = torch.Generator(device="cuda").manual_seed(3)
ops = []
for k, n in [(h, 3 * h), (h, h), (h, 2 * f), (f, h)]:
    x = torch.randn(T, k, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_(True)
    w = (torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02).requires_grad_(True)
    ops.append((x, w, torch.randn(T, n, device="cuda", dtype=torch.bfloat16, generator=gen)))
it = [0]


def iteration(observe):
    it[0] += 1
    stats.configure(1 if observe else 0)
    stats.on_iteration(it[0])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for layer in range(layers):
        for i, (x, w, dy) in enumerate(ops):
            x.grad = w.grad = None
            nvfp4_linear(x, w, None, rec, QuantContext(key=derive_key(1, it[0], layer * 4 + i, 0), seed=rec.seed)).backward(dy)
    t1 = time.perf_counter()
    if observe:
        stats.collect(it[0])
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3


for o in (False, True, False, True):
    iteration(o)
print("off (linears ms, collect+sync ms):", [tuple(round(v, 1) for v in iteration(False)) for _ in range(3)])
print("on  (linears ms, collect+sync ms):", [tuple(round(v, 1) for v in iteration(True)) for _ in range(3)])
pr = cProfile.Profile()
pr.enable()
iteration(True)
pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(30)
