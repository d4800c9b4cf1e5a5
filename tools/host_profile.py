"""Where the host time of one NVFP4 linear fwd+bwd goes, on the GPU (small T: the GPU never waits
for the host's issue, so wall time is host time). Prints per-recipe host ms, cProfile's top functions,
and the cost of one bare Triton launch against one torch launch.

    python -m tools.host_profile [--recipes quartet2,nvidia] [--tokens 256]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats

import torch

from benchmarks.timing import host_issue_ms
from megatron_fp4.linear import nvfp4_linear
from megatron_fp4.recipe import QuantContext
from megatron_fp4.registry import load_recipe
from megatron_fp4.rng import derive_key


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--recipes", default="quartet2,nvidia,tetrajet2")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--k", type=int, default=2048)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--top", type=int, default=35)
    a = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (it times the host side of GPU launches)")
    from megatron_fp4.kernels.rtn import tensor_amax
    x0 = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    y0 = torch.empty_like(x0)
    print(f"device {torch.cuda.get_device_name()}")
    print(f"one torch launch (copy_): {1e3 * host_issue_ms(lambda: y0.copy_(x0), calls=200):.1f} us; "
          f"torch.zeros(2): {1e3 * host_issue_ms(lambda: torch.zeros(2, device='cuda'), calls=200):.1f} us; "
          f"tensor_amax (1 zeros + 1 Triton launch): {1e3 * host_issue_ms(lambda: tensor_amax(x0), calls=200):.1f} us")
    for name in a.recipes.split(","):
        rec = load_recipe(name)
        x = torch.randn(a.tokens, a.k, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
        w = (torch.randn(a.n, a.k, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_(True)
        dy = torch.randn(a.tokens, a.n, device="cuda", dtype=torch.bfloat16)
        key = derive_key(1234, 0, 1, 0)

        def step():
            x.grad = None
            w.grad = None
            nvfp4_linear(x, w, None, rec, QuantContext(key=key, seed=rec.seed)).backward(dy)

        def bf16():
            x.grad = None
            w.grad = None
            torch.nn.functional.linear(x, w).backward(dy)
        host, host_bf16 = host_issue_ms(step, calls=50), host_issue_ms(bf16, calls=50)
        print(f"\n## {name}: host ms per fwd+bwd {host:.3f} (bf16 {host_bf16:.3f})")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(20):
            step()
        prof.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(a.top)
        print(s.getvalue()[-9000:])
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("cumtime").print_stats(a.top)
        print(s.getvalue()[-9000:])


if __name__ == "__main__":
    main()
