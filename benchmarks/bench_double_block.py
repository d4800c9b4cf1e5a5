"""GPU timing and exactness of the double-block kernels (not collected by pytest: no test_ prefix).

    python3 -m benchmarks.bench_double_block --out $OUT/qdb

bf16 randn [16384, 4096]: for each kernel, bits against the reference (for RHT-16: against the
reference run on the kernel's own rotation, and against the full reference composition), median
time after warm-up vs the reference torch path and vs a device copy of the input; a small launch
config sweep; and the tetrajet2 linear forward+backward with kernels on and off.
"""
import argparse
import json
import os
import sys

import torch
import triton

from benchmarks.timing import median_ms
from megatron_fp4 import quantizers as Q
from megatron_fp4.hadamard import rht
from megatron_fp4.rng import RandomStream, derive_key, random_signs
from megatron_fp4.kernels import dispatch
from megatron_fp4.kernels.double_block import quantize_double_block as kernel, rht16

OUT = {}
LINES = []
# BENCH_DRYRUN=1 (with TRITON_INTERPRET=1, small --rows/--cols): runs every step once on CPU, to
# check the script before spending device time
DRYRUN = os.environ.get("BENCH_DRYRUN") == "1"


def log(msg=""):
    print(msg, flush=True)
    LINES.append(msg)


def time_cuda(fn, warmup=3, reps=20):
    return median_ms(fn, warmup, reps, dryrun=DRYRUN)


def mismatch(got, ref):
    o, r = got.outer_scales, ref.outer_scales
    same = (o.view(torch.int32) == r.view(torch.int32)) | (o.isnan() & r.isnan())
    return ((got.packed != ref.packed).sum().item(),
            (got.block_scales.view(torch.uint8) != ref.block_scales.view(torch.uint8)).sum().item(),
            (~same).sum().item())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--cols", type=int, default=4096)
    args = ap.parse_args()
    if not DRYRUN and not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (BENCH_DRYRUN=1 TRITON_INTERPRET=1 with small --rows/--cols checks it on CPU)")
    dev = "cpu" if DRYRUN else "cuda"
    R, C = args.rows, args.cols
    name = "cpu (dry run)" if DRYRUN else torch.cuda.get_device_name()
    log(f"device: {name}, torch {torch.__version__}, triton {triton.__version__}")
    x = torch.randn(R, C, device=dev, generator=torch.Generator(dev).manual_seed(0)).to(torch.bfloat16)
    xf = torch.randn(R, C, device=dev, generator=torch.Generator(dev).manual_seed(1))
    sigma = random_signs(derive_key(1, 6), 16, dev)
    stream = RandomStream(derive_key(2, 3), 0, 0)
    y = torch.empty_like(x)
    t_copy = time_cuda(lambda: y.copy_(x))
    copy_bw = 2 * x.numel() * 2 / t_copy / 1e9   # bytes read + written, TB/s with ms
    log(f"copy bf16 [{R}x{C}]: {t_copy * 1e3:.1f} us, {copy_bw:.2f} TB/s")
    OUT["copy"] = dict(us=t_copy * 1e3, tbps=copy_bw)
    n = R * C
    out_bytes = n // 2 + n // 16 + n // 128 * 4

    cases = [
        ("RN fwd (X, W)", x, dict(), lambda: Q.quantize_double_block(x)),
        ("SR, no RHT", x, dict(mode="sr", stream=stream), lambda: Q.quantize_double_block(x, mode="sr", stream=stream)),
        ("RHT16+SR row-major (dgrad E)", x, dict(mode="sr", stream=stream, sigma=sigma),
         lambda: Q.quantize_double_block(rht(x, sigma), mode="sr", stream=stream)),
        ("RHT16+SR transposed (wgrad E^T)", x, dict(mode="sr", stream=stream, sigma=sigma, transpose=True),
         lambda: Q.quantize_double_block(rht(x.t(), sigma), mode="sr", stream=stream)),
        ("RHT16+SR transposed, FP32 src (X^T, W^T)", xf, dict(mode="sr", stream=stream, sigma=sigma, transpose=True),
         lambda: Q.quantize_double_block(rht(xf.t(), sigma), mode="sr", stream=stream)),
    ]
    log("\n| kernel | codes/inner/outer differing (vs ref on kernel z) | vs full reference | kernel us | "
        "GB/s | ratio to copy | reference us | speedup |")
    log("|---|---|---|---|---|---|---|---|")
    OUT["kernels"] = []
    for name, src, kw, ref_fn in cases:
        got = kernel(src, **kw)
        full_ref = ref_fn()
        if "sigma" in kw:
            z = rht16(src, sigma, transpose=kw.get("transpose", False))
            exact = mismatch(got, Q.quantize_double_block(z, mode=kw.get("mode", "rn"), stream=kw.get("stream")))
            del z
        else:
            exact = mismatch(got, full_ref)
        full = mismatch(got, full_ref)
        del got, full_ref
        t_k = time_cuda(lambda: kernel(src, **kw))
        t_r = time_cuda(ref_fn, warmup=1, reps=5)
        nbytes = src.numel() * src.element_size() + out_bytes
        bw = nbytes / t_k / 1e6
        log(f"| {name} | {exact} | {full} | {t_k * 1e3:.1f} | {bw:.0f} | {bw / 1e3 / copy_bw:.2f} | "
            f"{t_r * 1e3:.0f} | {t_r / t_k:.1f}x |")
        OUT["kernels"].append(dict(name=name, exact=exact, full=full, us=t_k * 1e3, gbps=bw, ref_us=t_r * 1e3))
        torch.cuda.empty_cache()

    log("\n### launch configs (BR, BC, warps): us, bits vs default config")
    OUT["sweep"] = []
    for name, kw, configs in (
            ("RN fwd", dict(), [(32, 128, 4), (16, 128, 4), (64, 128, 4), (32, 256, 8), (64, 128, 8)]),
            ("RHT16+SR row-major", dict(mode="sr", stream=stream, sigma=sigma),
             [(32, 128, 4), (16, 128, 4), (64, 128, 4), (64, 128, 8)]),
            ("RHT16+SR transposed", dict(mode="sr", stream=stream, sigma=sigma, transpose=True),
             [(64, 128, 4), (32, 128, 4), (128, 128, 8), (64, 256, 8)])):
        base = kernel(x, **kw)
        row = []
        for br, bc, w in configs:
            cfg = dict(block_r=br, block_c=bc, num_warps=w)
            try:
                got = kernel(x, **kw, **cfg)
                diff = mismatch(got, base)
                t = time_cuda(lambda: kernel(x, **kw, **cfg))
                row.append(f"({br},{bc},{w}) {t * 1e3:.1f} {diff}")
                OUT["sweep"].append(dict(kernel=name, cfg=[br, bc, w], us=t * 1e3, diff=diff))
            except Exception as e:  # noqa: BLE001 - a config that fails to compile is reported, not fatal
                row.append(f"({br},{bc},{w}) failed: {type(e).__name__}")
        log(f"- {name}: " + "; ".join(row))

    # corner cases where Triton's flush-to-zero could differ from torch (documented in the module)
    s = torch.randn(64, 256, device=dev)
    s[3, :16] = 1e-30
    s[3, 16] = 1e4
    s[5, 130:140] = 1e-40
    s[6, 128:256] = 1e-36
    s[7, 0:128] = torch.randn(128, device=dev) * 1e-3
    s[7, 5] = 1e-42
    diag = {}
    for mode in ("rn", "sr"):
        st = stream if mode == "sr" else None
        diag[mode] = mismatch(kernel(s, mode=mode, stream=st), Q.quantize_double_block(s, mode=mode, stream=st))
    log(f"\nsubnormal corner cases (codes/inner/outer differing): {diag}")
    OUT["subnormal_corners"] = diag

    # tetrajet2 linear forward + backward, kernels on vs off (same recipe object)
    from megatron_fp4.linear import nvfp4_linear
    from megatron_fp4.recipe import QuantContext
    from megatron_fp4.registry import load_recipe
    rec = load_recipe("tetrajet2")
    T, K, N = (R, 4096, 4096) if not DRYRUN else (R, C, C)
    xa = torch.randn(T, K, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(N, K, device=dev) * 0.02).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(T, N, device=dev, dtype=torch.bfloat16)

    def step(recipe):
        def f():
            xa.grad = None
            w.grad = None
            out = torch.nn.functional.linear(xa, w) if recipe is None else \
                nvfp4_linear(xa, w, None, recipe, QuantContext(key=5, seed=recipe.seed))
            out.backward(dy)
        return f
    t_bf = time_cuda(step(None), reps=10)
    t_ker = time_cuda(step(rec), reps=10)
    with dispatch.reference_only():
        t_ref = time_cuda(step(rec), warmup=1, reps=5)
    log(f"\ntetrajet2 linear fwd+bwd T={T} K={K} N={N}: bf16 {t_bf:.2f} ms, kernels {t_ker:.2f} ms "
        f"({t_ker / t_bf:.2f}x), reference quantizers {t_ref:.2f} ms ({t_ref / t_bf:.2f}x)")
    OUT["linear"] = dict(bf16_ms=t_bf, kernels_ms=t_ker, reference_ms=t_ref)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(OUT, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write("\n".join(LINES) + "\n")


if __name__ == "__main__":
    sys.exit(main())
