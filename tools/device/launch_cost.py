"""Host cost of one launch on this machine (issues #17, #19): a torch op, a Triton kernel with 2 and
with 26 arguments through JITFunction.run, the statistics' observation kernel through
kernels/stats.observe, and the statistics' bookkeeping per observation without the write.
Medians of 2000 calls, after warm-up; the GPU synchronised only between groups of calls."""
import statistics
import time

import torch
import triton
import triton.language as tl

from megatron_fp4 import stats
from megatron_fp4.backend import BackendConfig
from megatron_fp4.kernels import dispatch as D
from megatron_fp4.kernels.stats import observe


@triton.jit
def _k2(p, n, B: tl.constexpr):
    i = tl.arange(0, B)
    tl.store(p + i, i.to(tl.float32), mask=i < n)


@triton.jit
def _k26(p, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19, a20,
         a21, a22, a23, a24, n, B: tl.constexpr):
    i = tl.arange(0, B)
    tl.store(p + i, i.to(tl.float32), mask=i < n)


def per_call_us(fn, n=2000, groups=5):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(groups):
        t = time.perf_counter()
        for _ in range(n // groups):
            fn()
        out.append((time.perf_counter() - t) / (n // groups) * 1e6)
        torch.cuda.synchronize()
    return statistics.median(out)


buf = torch.zeros(1024, device="cuda")
ints = list(range(3, 27))
print(f"device {torch.cuda.get_device_name()}")
print(f"torch.zeros(2): {per_call_us(lambda: torch.zeros(2, device='cuda')):.1f} us")
print(f"buf.add_(1): {per_call_us(lambda: buf.add_(1)):.1f} us")
print(f"triton, 2 args: {per_call_us(lambda: _k2[(1,)](buf, 100, B=128)):.1f} us")
print(f"triton, 26 args: {per_call_us(lambda: _k26[(1,)](buf, *ints[:24], 100, B=128)):.1f} us")
x = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16)
q = D.quantize_nvfp4.__wrapped__(x)
spec = stats.plain_source((x,), {}, q)[0]
arena = torch.zeros(64, spec.layout.width, device="cuda")
print(f"stats observe kernel (x 4096x2048): {per_call_us(lambda: observe(spec, arena, 3)):.1f} us")
stats.configure(1)
stats.on_iteration(1)
stats.set_layer("L")
noop = lambda spec, arena, i: None       # noqa: E731
print(f"stats bookkeeping without the write: "
      f"{per_call_us(lambda: stats._observe(stats.plain_source, noop, (x,), {'site': ('r', 'forward X')}, q, False), n=400):.1f} us")
stats.configure(0)
