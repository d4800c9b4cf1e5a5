"""Leave-one-out variant timings and exactness of the fast paths, on one CUDA GPU, in one run.

    python -m tools.bench_variants [--out DIR]

1. exact_div (reciprocal + one FMA correction) against div.rn.f32 on ~10^9 random and tie-targeted
   (x, d) pairs, bf16 numerators, subnormal numerators and quotients;
2. every kernel variant (a constexpr switch turned back to the slow form, one at a time) timed side by
   side on the same [16384 x 4096] bf16 randn operand, with its outputs compared to the default's;
3. the GEMM epilogue: separate mul_ + cast passes vs the fused scale_cast pass.
"""
from __future__ import annotations

import argparse
import os

import torch
import triton
import triton.language as tl

from benchmarks.timing import median_ms
from megatron_fp4 import quantizers as Q
from megatron_fp4.rng import RandomStream, derive_key, random_signs
from megatron_fp4.kernels._common import div_prep, exact_div
from megatron_fp4.kernels.eden import rht_ms_eden
from megatron_fp4.kernels.rtn import quantize_nvfp4_rtn, tensor_amax
from megatron_fp4.kernels import dispatch as D

LINES = []


def log(m=""):
    print(m, flush=True)
    LINES.append(m)


def bench(fn, reps=30, warmup=5):
    return median_ms(fn, warmup, reps) * 1e3   # us


@triton.jit
def _div_check_kernel(x_ptr, d_ptr, ref_ptr, fast_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=1.0)
    d = tl.load(d_ptr + offs, mask=m, other=1.0)
    tl.store(ref_ptr + offs, tl.math.div_rn(x, d), mask=m)
    dn, p, r = div_prep(d)
    tl.store(fast_ptr + offs, exact_div(x, dn, p, r, False), mask=m)


def rand_float(n, emin, emax, gen, mant_bits=23):
    e = torch.randint(emin + 127, emax + 128, (n,), device="cuda", generator=gen, dtype=torch.int32)
    mant = torch.randint(0, 1 << 23, (n,), device="cuda", generator=gen, dtype=torch.int32)
    mant = mant & ~((1 << (23 - mant_bits)) - 1)
    sign = torch.randint(0, 2, (n,), device="cuda", generator=gen, dtype=torch.int32) << 31
    return (sign | (e.clamp(min=0) << 23) | mant).view(torch.float32)


def div_check(batches=16, n=1 << 26):
    gen = torch.Generator(device="cuda").manual_seed(0)
    ref = torch.empty(n, device="cuda")
    fast = torch.empty(n, device="cuda")
    cases = {}
    for b in range(batches):
        kind = b % 4
        if kind == 0:      # random x (subnormal x included: exponent field 0), random normal d
            x = rand_float(n, -127, 12, gen)
            d = rand_float(n, -126, 126, gen).abs()
            name = "random x (incl. subnormal) / random normal d"
        elif kind == 1:    # bf16 x, d = e4m3 scale * random g (the kernels' divisors)
            x = rand_float(n, -40, 20, gen, mant_bits=7)
            s = torch.randint(1, 0x7F, (n,), device="cuda", generator=gen, dtype=torch.uint8)
            g = rand_float(n, -100, 100, gen).abs()
            d = s.view(torch.float8_e4m3fn).float() * g
            d = torch.where(d >= 2.0 ** -126, d, torch.ones_like(d))
            name = "bf16 x / (e4m3 s * fp32 g)"
        elif kind == 2:    # quotients within a few ulps of the E2M1 midpoints (the tie cases)
            d = rand_float(n, -60, 60, gen).abs()
            mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 0.5, 1.0], device="cuda")
            t = mids[torch.randint(0, 10, (n,), device="cuda", generator=gen)]
            x = (t * d)
            jitter = torch.randint(-3, 4, (n,), device="cuda", generator=gen, dtype=torch.int32)
            x = (x.view(torch.int32) + jitter).view(torch.float32)
            name = "quotients within 3 ulp of E2M1 midpoints"
        else:              # tiny quotients: subnormal results and tiny numerators
            x = rand_float(n, -149, -100, gen)
            d = rand_float(n, -126, 30, gen).abs()
            name = "tiny x (quotients down to subnormal)"
        ok = torch.isfinite(x) & torch.isfinite(d) & (d >= 2.0 ** -126) & (d < 2.0 ** 127)
        x = torch.where(ok, x, torch.ones_like(x))
        d = torch.where(ok, d, torch.ones_like(d))
        _div_check_kernel[(triton.cdiv(n, 1024),)](x, d, ref, fast, n, BLOCK=1024, enable_fp_fusion=False)
        tref = x / d                    # torch's CUDA division: IEEE, subnormals kept (Triton code runs FTZ)
        differ = tref.view(torch.int32) != fast.view(torch.int32)
        ref = tref
        normal = (ref.abs() >= 2.0 ** -100) & (ref.abs() <= 2.0 ** 20)   # the kernels' range: |y| < 8, |x/g| < 2^12
        c = cases.setdefault(name, [0, 0, 0, 0])
        c[0] += n
        c[1] += int((differ & normal).sum())
        c[2] += int((differ & ~normal).sum())
        c[3] += int((~normal).sum())
        big = ref.abs() > 2.0 ** 20
        c.append(int((differ & big).sum()))
    log("\n### exact_div vs div.rn.f32 (bits compared)\n")
    log("| case | pairs | differing, 2^-100 <= abs(quotient) <= 2^20 | differing outside (of pairs outside) | of which abs(quotient) > 2^20 (x*p overflows) |")
    log("|---|---|---|---|---|")
    for name, c in cases.items():
        tot, dn, ds, ns = c[:4]
        log(f"| {name} | {tot} | {dn} | {ds} (of {ns}) | {sum(c[4:])} |")


def same(a, b):
    c = int((a.packed != b.packed).sum())
    s = int((a.block_scales.view(torch.uint8) != b.block_scales.view(torch.uint8)).sum())
    g = bool((a.tensor_scale.view(torch.int32) == b.tensor_scale.view(torch.int32)).all())
    return f"{c}/{s}/{'=' if g else 'g differs'}"


def variants(rows=16384, cols=4096):
    gen = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(rows, cols, device="cuda", generator=gen).to(torch.bfloat16)
    n = rows * cols
    big = torch.randn(1 << 29, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(big)
    t_copy = bench(lambda: dst.copy_(big), reps=20)
    copy_bw = 4 * big.numel() / t_copy / 1e6
    del big, dst
    torch.cuda.empty_cache()
    log(f"\n### Variants, [{rows}x{cols}] bf16 randn; device copy {copy_bw:.2f} TB/s\n")
    floor = 2 * n + n // 2 + n // 16
    log("| kernel | variant | us | ratio to copy (floor bytes) | vs default codes/scales/g |")
    log("|---|---|---|---|---|")

    def row(kname, vname, fn, nbytes, ref=None):
        out = fn()
        t = bench(fn)
        cmp = same(out, ref) if ref is not None and hasattr(out, "packed") else "-"
        log(f"| {kname} | {vname} | {t:.1f} | {nbytes / t / 1e6 / copy_bw:.2f} | {cmp} |")
        return out

    sigma = random_signs(derive_key(7, 5), 128, "cuda")
    st = RandomStream(derive_key(8, 3))
    xq = Q.quantize_nvfp4(x, smax=256.0, four_over_six=True)
    eden_operands = (("EDEN dense", dict(a=x), floor), ("EDEN transposed", dict(a=x, transpose=True), floor),
                     ("EDEN from packed", dict(packed=xq), 2 * (n // 2 + n // 16)))
    if os.environ.get("VARIANTS_ONLY") == "tree":
        # the fixed-order EDEN sums' cost alone (one short call): default (TREE=True) vs tl.sum's order
        for label, kw, nbytes in eden_operands:
            for _ in range(2):   # twice, interleaved: the spread of one row is visible
                ref = row(label, "default (TREE=True)", lambda: rht_ms_eden(sigma=sigma, stream=st, **kw), nbytes)
                row(label, "TREE=False", lambda: rht_ms_eden(sigma=sigma, stream=st, variant=dict(TREE=False), **kw),
                    nbytes, ref)
        return
    if os.environ.get("VARIANTS_ONLY") == "amax":
        # the amax pass: tiles per program (unrolled, all loads in flight) x tile size x atomics/partials,
        # then the RTN kernels end to end with the amax pass's tiling changed (rtn.AMAX_TILES)
        from megatron_fp4.kernels import rtn as _rtn
        for m in (0, 1):
            for tiles, block in ((1, 8192), (2, 8192), (4, 4096), (8, 4096), (4, 8192), (16, 2048)):
                row("tensor amax alone", f"AMAX_MODE={m} tiles={tiles} block={block}",
                    lambda: tensor_amax(x, m, tiles=tiles, block=block), 2 * n)
        default_tiles = _rtn.AMAX_TILES
        for four_six in (False, True):
            kn = "RTN 1x16" + (" + 4/6" if four_six else "")
            smax = 256.0 if four_six else 448.0
            ref = None
            for tiles in (1, 4, 8, 1):
                _rtn.AMAX_TILES = tiles
                out = row(kn, f"AMAX_TILES={tiles}", lambda: quantize_nvfp4_rtn(x, smax=smax, four_over_six=four_six),
                          floor, ref)
                ref = out if ref is None else ref
        _rtn.AMAX_TILES = default_tiles
        return
    for m in (1, 0):
        row("tensor amax alone", f"AMAX_MODE={m} ({'partials + reduce' if m else 'atomics'})",
            lambda: tensor_amax(x, m), 2 * n)
    old = dict(FAST_DIV=False, FAST_RN=0, SSE_MODE=0, LOAD3D=False, AMAX_MODE=0)
    for four_six in (False, True):
        kn = "RTN 1x16" + (" + 4/6" if four_six else "")
        smax = 256.0 if four_six else 448.0
        ref = row(kn, "default (all fast)", lambda: quantize_nvfp4_rtn(x, smax=smax, four_over_six=four_six), floor)
        outs = [("first cut (all slow)", old)]
        outs += [(f"{k}={v}", {k: v}) for k, v in (("FAST_DIV", False), ("FAST_RN", 0), ("FAST_RN", 1),
                                                   ("LOAD3D", False), ("AMAX_MODE", 0))]
        if four_six:
            outs += [("SSE_MODE=0 (FP64 always)", {"SSE_MODE": 0}),
                     ("SSE_MODE=2 (FP32 only: NOT exact, timing)", {"SSE_MODE": 2})]
        for vn, var in outs:
            row(kn, vn, lambda: quantize_nvfp4_rtn(x, smax=smax, four_over_six=four_six, variant=var), floor, ref)
        for br, bc, nw in ((16, 256, 4), (64, 128, 8)):
            row(kn, f"BR={br} BC={bc} warps={nw}",
                lambda: quantize_nvfp4_rtn(x, smax=smax, four_over_six=four_six, block_r=br, block_c=bc,
                                           num_warps=nw), floor, ref)
    for label, kw, nbytes in eden_operands:
        ref = row(label, "default", lambda: rht_ms_eden(sigma=sigma, stream=st, **kw), nbytes)
        row(label, "pass 1 alone (rotate + amax)", lambda: rht_ms_eden(sigma=sigma, stream=st, amax_only=True, **kw),
            nbytes)
        row(label, "pass 1 alone, TILES=1", lambda: rht_ms_eden(sigma=sigma, stream=st, amax_only=True,
                                                                variant=dict(TILES=1), **kw), nbytes)
        for vn, var in (("first cut (all slow)", dict(FAST_DIV=False, FAST_RN=0, AMAX_MODE=0)),
                        ("FAST_DIV=False", dict(FAST_DIV=False)), ("FAST_RN=0", dict(FAST_RN=0)),
                        ("FAST_RN=2 (code from the RNE sum)", dict(FAST_RN=2)),
                        ("BAMAX=False (block amax reduced in pass 2, replicated layout)", dict(BAMAX=False)),
                        ("TREE=False (tl.sum's order for the EDEN sums; rarely other bits than the twin's)",
                         dict(TREE=False)),
                        ("AMAX_MODE=0", dict(AMAX_MODE=0)), ("TILES=1 (h reloaded per 64-row tile)", dict(TILES=1)),
                        ("TILES=8", dict(TILES=8))):
            row(label, vn, lambda: rht_ms_eden(sigma=sigma, stream=st, variant=var, **kw), nbytes, ref)
        for br, nw in ((64, 8),):
            row(label, f"BR={br} warps={nw}", lambda: rht_ms_eden(sigma=sigma, stream=st, block_r=br, num_warps=nw, **kw),
                nbytes, ref)


def epilogue(t=16384, k=4096, n=11008):
    gen = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(t, k, device="cuda", generator=gen).to(torch.bfloat16)
    w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    xq = quantize_nvfp4_rtn(x, smax=256.0, four_over_six=True)
    wq = quantize_nvfp4_rtn(w, smax=256.0, four_over_six=True)
    log(f"\n### GEMM epilogue, fprop T={t} K={k} N={n}\n")
    log("| path | us |")
    log("|---|---|")
    a16, b16 = D.dequantize_unscaled(xq), D.dequantize_unscaled(wq)
    log(f"| BF16 mm (bf16 out) | {bench(lambda: torch.mm(x, w.t())):.0f} |")
    log(f"| mm fp32 out alone | {bench(lambda: torch.mm(a16, b16.t(), out_dtype=torch.float32)):.0f} |")
    log(f"| mm bf16 out alone (dequantized operands) | {bench(lambda: torch.mm(a16, b16.t())):.0f} |")
    log(f"| dequant both | {bench(lambda: (D.dequantize_unscaled(xq), D.dequantize_unscaled(wq))):.0f} |")
    slow = lambda: (D.matmul(xq, wq) * wq.tensor_scale).to(torch.bfloat16)
    fast = lambda: D.matmul(xq, wq, scale=wq.tensor_scale, out_dtype=torch.bfloat16)
    log(f"| dequant + mm + mul_ + *g + cast (recipe today) | {bench(slow):.0f} |")
    log(f"| dequant + mm + fused scale_cast | {bench(fast):.0f} |")
    log(f"\nfused epilogue identical to the unfused: {torch.equal(slow().view(torch.int16), fast().view(torch.int16))}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    log(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}")
    sections = (div_check, variants, epilogue)
    if os.environ.get("DIV_ONLY"):
        sections = (div_check,)
    elif os.environ.get("VARIANTS_ONLY"):
        sections = (variants,)
    for f in sections:
        try:
            f()
        except Exception as e:   # one failing section must not hide the others
            import traceback
            log(f"!! {f.__name__} failed: {type(e).__name__}: {e}")
            traceback.print_exc()
        with open(os.path.join(args.out, "variants.md"), "w") as fh:
            fh.write("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
