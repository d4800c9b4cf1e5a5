"""Kernel benchmark on one CUDA GPU: bit-exactness at realistic shapes, bandwidth vs device copy,
and the quartet2 linear forward+backward at Llama-7B shapes (reference torch path vs kernels, each
as a ratio to BF16 measured in the same run).

    python -m benchmarks.bench_kernels [--out DIR] [--quick]

Writes DIR/results.md (markdown tables), DIR/results.json and prints the tables last.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
import traceback

import torch
import triton

from benchmarks._runs import put_marked_block
from benchmarks.timing import host_issue_ms, median_ms
from megatron_fp4 import backend
from megatron_fp4 import quantizers as Q
from megatron_fp4.hadamard import rht
from megatron_fp4.linear import nvfp4_linear
from megatron_fp4.recipe import QuantContext, Quartet2Recipe
from megatron_fp4.registry import load_recipe
from megatron_fp4.rng import RandomStream, Role, derive_key, random_signs
from megatron_fp4.kernels import dispatch as D
from megatron_fp4.kernels.dequant import dequantize_unscaled_bf16
from megatron_fp4.kernels.eden import rht128, rht_ms_eden
from megatron_fp4.kernels.eden16 import rht_ms_eden16
from megatron_fp4.kernels.rtn import quantize_nvfp4_rtn, tensor_amax

# BENCH_DRYRUN=1: run every code path on CPU under the Triton interpreter at tiny shapes (checks the
# script itself before spending device time); timings are then meaningless.
DRYRUN = os.environ.get("BENCH_DRYRUN") == "1"
DEV = "cpu" if DRYRUN else "cuda"

LINES: list[str] = []
RESULTS: dict = {"exact": [], "bandwidth": [], "linear": [], "stages": [], "errors": []}


def empty_cache():
    if not DRYRUN:
        torch.cuda.empty_cache()


def log(msg=""):
    print(msg, flush=True)
    LINES.append(msg)


def time_cuda(fn, warmup=3, reps=20):
    """Median milliseconds after warm-up (benchmarks/timing.py)."""
    return median_ms(fn, warmup, reps, dryrun=DRYRUN)


def guarded(name):
    def deco(f):
        def run(*a, **kw):
            try:
                return f(*a, **kw)
            except Exception as e:  # one failing section must not hide the others
                log(f"!! {name} failed: {type(e).__name__}: {e}")
                RESULTS["errors"].append(f"{name}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        return run
    return deco


def mismatch(got, ref):
    codes = (got.packed != ref.packed).sum().item()
    scales = (got.block_scales.view(torch.uint8) != ref.block_scales.view(torch.uint8)).sum().item()
    g_same = bool((got.tensor_scale.view(torch.int32) == ref.tensor_scale.view(torch.int32)).all())
    return codes, scales, g_same


def randn(rows, cols, seed, dtype=torch.bfloat16):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randn(rows, cols, generator=gen, device=DEV, dtype=torch.float32).to(dtype)


# ---------------------------------------------------------------------------------------------
@guarded("exactness")
def exactness(rows, cols):
    x = randn(rows, cols, 1)
    sigma = random_signs(derive_key(7, int(Role.RHT_SIGNS)), 128, DEV)
    stream = RandomStream(derive_key(8, 3), 0, 0)
    checks = []
    for four_six in (False, True):
        smax = 256.0 if four_six else 448.0
        got = quantize_nvfp4_rtn(x, smax=smax, four_over_six=four_six)
        ref = Q.quantize_nvfp4(x, smax=smax, four_over_six=four_six)
        label = f"RTN 1x16{' + 4/6' if four_six else ''} [{rows}x{cols}] vs quantize_nvfp4"
        # strict since the 4/6 SSE sums run in one fixed order in both twins: the table's columns
        # must read 0
        checks.append((label, got, ref, int(got.flushed_blocks) == int(ref.flushed_blocks)))
    xq = Q.quantize_nvfp4(x, smax=256.0, four_over_six=True)
    for label, kw, src in (("RHT+MS-EDEN dense", dict(a=x), x),
                           ("RHT+MS-EDEN transposed", dict(a=x, transpose=True), x.t()),
                           ("re-quantize from packed", dict(packed=xq), None)):
        got = rht_ms_eden(sigma=sigma, stream=stream, **kw)
        z_k = rht128(sigma=sigma, **kw)
        ref_own = Q.quantize_ms_eden(z_k, stream=stream)
        checks.append((f"{label}: given kernel z", got, ref_own, True))
        src = xq.dequantize_unscaled().t() if src is None else src
        z_ref = rht(src, sigma)
        rel = ((z_k - z_ref).norm() / z_ref.norm()).item()
        maxulp = (z_k.view(torch.int32).long() - z_ref.view(torch.int32).long()).abs().max().item()
        ref_full = Q.quantize_ms_eden(z_ref, stream=stream)
        checks.append((f"{label}: vs torch rht (rel err {rel:.1e}, max {maxulp} ulp)", got, ref_full, True))
        del z_k, z_ref, ref_own, ref_full
    log(f"\n### Bit-exactness on the GPU, bf16 randn [{rows}x{cols}]\n")
    log("| check | code bytes differing | scales differing (of %d) | tensor scale equal |" % (rows * cols // 16))
    log("|---|---|---|---|")
    for label, got, ref, counts_ok in checks:
        c, s, g = mismatch(got, ref)
        log(f"| {label} | {c} | {s} | {g} |")
        RESULTS["exact"].append(dict(check=label, codes=c, scales=s, g_equal=g, counts_equal=counts_ok))
    empty_cache()


# ---------------------------------------------------------------------------------------------
@guarded("bandwidth")
def bandwidth(rows, cols):
    n = rows * cols
    big = torch.randn(1 << (12 if DRYRUN else 29), device=DEV, dtype=torch.bfloat16)   # 1 GiB
    dst = torch.empty_like(big)
    t_copy = time_cuda(lambda: dst.copy_(big), warmup=3, reps=20)
    copy_bw = 2 * big.numel() * 2 / t_copy / 1e9                          # TB/s (bytes read + written)
    del big, dst
    empty_cache()
    x = randn(rows, cols, 2)
    sigma = random_signs(derive_key(7, int(Role.RHT_SIGNS)), 128, DEV)
    stream = RandomStream(derive_key(8, 3))
    xq = Q.quantize_nvfp4(x, smax=256.0, four_over_six=True)
    out_bytes = n // 2 + n // 16 + 4
    entries = [
        ("tensor amax pass alone (bf16 in)", lambda: tensor_amax(x), 2 * n),
        ("RTN 1x16 (bf16 in, packed out)", lambda: quantize_nvfp4_rtn(x), 2 * n + out_bytes),
        ("RTN 1x16 + 4/6", lambda: quantize_nvfp4_rtn(x, smax=256.0, four_over_six=True), 2 * n + out_bytes),
        ("RHT-128 + MS-EDEN, row-major (dgrad E)", lambda: rht_ms_eden(x, sigma, stream), 2 * n + out_bytes),
        ("RHT-128 + MS-EDEN, transposed (wgrad E^T)",
         lambda: rht_ms_eden(x, sigma, stream, transpose=True), 2 * n + out_bytes),
        ("re-quantize from packed (X̂^T / Ŵ^T)", lambda: rht_ms_eden(None, sigma, stream, packed=xq),
         2 * out_bytes),
        ("RTN 16x16 tiles + 4/6 (nvidia-46 W)",
         lambda: quantize_nvfp4_rtn(x, smax=256.0, four_over_six=True, block_rows=16), 2 * n + n // 2 + n // 256 + 4),
        ("RHT-128 + MS-EDEN per-16, row-major (quartet2-kernel E)", lambda: rht_ms_eden16(x, sigma, stream),
         2 * n + out_bytes),
        ("RHT-128 + MS-EDEN per-16, transposed (quartet2-kernel E^T)",
         lambda: rht_ms_eden16(x, sigma, stream, transpose=True), 2 * n + out_bytes),
        ("dequant packed -> bf16 (GEMM operand)", lambda: dequantize_unscaled_bf16(xq), n // 2 + n // 16 + 2 * n),
    ]
    refs = [
        ("reference torch RTN + 4/6", lambda: Q.quantize_nvfp4(x, smax=256.0, four_over_six=True), 2 * n + out_bytes),
        ("reference torch rht + MS-EDEN", lambda: Q.quantize_ms_eden(rht(x, sigma), stream=stream), 2 * n + out_bytes),
    ]
    log(f"\n### Bandwidth, [{rows}x{cols}] bf16 randn; device copy {copy_bw:.2f} TB/s "
        f"(1 GiB bf16, bytes read + written)\n")
    log("| kernel | median time (us) | bytes that must move (MB) | achieved TB/s | ratio to copy |")
    log("|---|---|---|---|---|")
    RESULTS["copy_tbps"] = copy_bw
    for label, fn, nbytes in entries + refs:
        t = time_cuda(fn, warmup=5, reps=30 if "reference" not in label else 5)
        bw = nbytes / t / 1e9
        log(f"| {label} | {t * 1e3:.1f} | {nbytes / 1e6:.1f} | {bw:.2f} | {bw / copy_bw:.2f} |")
        RESULTS["bandwidth"].append(dict(kernel=label, us=t * 1e3, bytes=nbytes, tbps=bw, ratio=bw / copy_bw))
    # launch-config sweep for the EDEN kernels (correctness of each config is checked against the default)
    log("\nEDEN block-rows / warps sweep (us):")
    base = {m: None for m in ("dense", "T", "packed")}
    for br in ((64,) if DRYRUN else (32, 64)):
        for nw in ((4,) if DRYRUN else (4, 8)):
            row = []
            for m, kw in (("dense", dict(a=x)), ("T", dict(a=x, transpose=True)), ("packed", dict(packed=xq))):
                try:
                    got = rht_ms_eden(sigma=sigma, stream=stream, block_r=br, num_warps=nw, **kw)
                    if base[m] is None:
                        base[m] = got
                    same = mismatch(got, base[m])
                    t = time_cuda(lambda: rht_ms_eden(sigma=sigma, stream=stream, block_r=br, num_warps=nw, **kw),
                                  warmup=3, reps=15)
                    row.append(f"{m}={t * 1e3:.0f}{'' if same[0] == 0 and same[1] == 0 else '(DIFF)'}")
                except Exception as e:
                    row.append(f"{m}=ERR({type(e).__name__})")
            log(f"  BR={br} warps={nw}: " + ", ".join(row))
    empty_cache()


# ---------------------------------------------------------------------------------------------
LLAMA7B = [("qkv", 4096, 3 * 4096), ("o", 4096, 4096), ("gate+up", 4096, 2 * 11008), ("down", 11008, 4096)]


def _linear_step(recipe, x, w, dy, key, reference=False):
    """One forward + backward; reference=True runs the recipe's torch twins instead of the kernels."""
    def step():
        w.grad = None
        x.grad = None
        with D.reference_only() if reference else contextlib.nullcontext():
            if recipe is None:
                y = torch.nn.functional.linear(x, w)
            else:
                y = nvfp4_linear(x, w, None, recipe, QuantContext(key=key, seed=recipe.seed))
            y.backward(dy)
    return step


LLAMA1B = [("qkv", 2048, 3 * 2048), ("o", 2048, 2048), ("gate+up", 2048, 2 * 5632), ("down", 5632, 2048)]
QUALITY = [("qkv", 256, 768), ("o", 256, 256), ("gate+up", 256, 1536), ("down", 768, 256)]
RECIPES = ("bf16", "nvidia", "tetrajet2", "quartet2")
# The linear table's columns: every recipe on its default GPU path, plus the alternatives the dispatch
# offers (backend emit_operands=False: backward quantizers do not write the BF16 GEMM operand, a
# dequant pass runs instead; backend gemm="triton": the packed-operand Triton GEMM for per-tensor-scaled
# recipes; TetraJet-v2 with gemm_emulation=exact, which runs that GEMM per 128-slab, against its
# default "bf16" folding + cuBLAS). (label, recipe name or None for BF16, overrides, backend changes)
VARIANTS = [("bf16", None, {}, {}), ("nvidia", "nvidia", {}, {}), ("tetrajet2", "tetrajet2", {}, {}),
            ("tetrajet2 exact-gemm", "tetrajet2", {"gemm_emulation": "exact"}, {}),
            ("quartet2", "quartet2", {}, {}),
            ("quartet2 no-emit", "quartet2", {}, {"emit_operands": False}),
            ("quartet2 triton-gemm", "quartet2", {}, {"gemm": "triton"}),
            ("nvidia triton-gemm", "nvidia", {}, {"gemm": "triton"})]


@guarded("linear")
def linear_block(tokens, reps, shapes, label):
    """Forward + backward of every variant for the four linears of one block, each as a ratio to BF16
    timed in the same loop."""
    names = [v[0] for v in VARIANTS]
    log(f"\n### Linear forward + backward (dgrad + wgrad), T={tokens}, {label} block linears\n")
    log("| linear (K -> N) | " + " | ".join(f"{r} ms" for r in names) + " | "
        + " | ".join(f"{r}/bf16" for r in names[1:]) + " |")
    log("|---" * (2 * len(names)) + "|")
    totals = dict.fromkeys(names, 0.0)
    for name, k, n in shapes:
        x = randn(tokens, k, 10).requires_grad_(True)
        w = (randn(n, k, 11) * 0.02).requires_grad_(True)
        dy = randn(tokens, n, 12) * 1e-3
        key = derive_key(1234, 0, 1, 0)
        times = {}
        for r, recipe_name, overrides, variables in VARIANTS:
            recipe = None if recipe_name is None else load_recipe(recipe_name, overrides)
            with backend.use(**variables):
                times[r] = time_cuda(_linear_step(recipe, x, w, dy, key), warmup=3, reps=reps)
            totals[r] += times[r]
            empty_cache()
        log(f"| {name} ({k} -> {n}) | " + " | ".join(f"{times[r]:.2f}" for r in names) + " | "
            + " | ".join(f"{times[r] / times['bf16']:.2f}x" for r in names[1:]) + " |")
        RESULTS["linear"].append(dict(shapes=label, linear=name, k=k, n=n, **{f"{r}_ms": times[r] for r in names}))
        if name == "down" and label.startswith("Llama-7B"):
            agreement(Quartet2Recipe(), x, w, dy, key)
            recipe = Quartet2Recipe()
            t_ref = time_cuda(_linear_step(recipe, x, w, dy, key, reference=True), warmup=1, reps=3)
            log(f"quartet2 down proj with the torch twins (dispatch.reference_only()): {t_ref:.2f} ms = "
                f"{t_ref / times['bf16']:.1f}x BF16; with the kernels {times['quartet2'] / times['bf16']:.2f}x\n")
            RESULTS["reference_down_ms"] = t_ref
        del x, w, dy
        empty_cache()
    log(f"| **block total** | " + " | ".join(f"{totals[r]:.2f}" for r in names) + " | "
        + " | ".join(f"**{totals[r] / totals['bf16']:.2f}x**" for r in names[1:]) + " |")
    RESULTS.setdefault("linear_totals", {})[label] = totals


@guarded("gemm")
def gemm_backends(tokens, shapes, label):
    """The three GEMMs of each linear on packed operands, both ways the dispatch can run them: the
    dequant kernel + cuBLAS (+ epilogue pass) and the Triton GEMM on packed operands (every config),
    next to the BF16 GEMM of the same shape; the winner per shape is named. Double-block: the Triton
    GEMM's exact per-slab mode against the "bf16" folding + cuBLAS."""
    from megatron_fp4.kernels.gemm import CONFIGS, nvfp4_matmul
    log(f"\n### GEMM on packed operands, T={tokens}, {label} (ms; per-tensor-scaled operands, bf16 output)\n")
    cfgs = list(CONFIGS)
    log("| GEMM (M x N x K) | BF16 mm | dequant + cuBLAS | " + " | ".join(f"triton {c}" for c in cfgs)
        + " | winner / BF16 | double-block exact (triton) | double-block bf16 (dequant + cuBLAS) |")
    log("|---" * (5 + len(cfgs)) + "|")
    for name, k, n in shapes:
        for gemm_name, (m_, n_, k_) in (("fprop", (tokens, n, k)), ("dgrad", (tokens, k, n)),
                                        ("wgrad", (n, k, tokens))):
            a, b = randn(m_, k_, 30), randn(n_, k_, 31)
            aq, bq = quantize_nvfp4_rtn(a), quantize_nvfp4_rtn(b)
            t_bf16 = time_cuda(lambda: torch.mm(a, b.t()))
            with backend.use(gemm="cublas"):
                t_cublas = time_cuda(lambda: D.matmul(aq, bq, out_dtype=torch.bfloat16))
            t_triton = {c: time_cuda(lambda c=c: nvfp4_matmul(aq, bq, out_dtype=torch.bfloat16, config=c))
                        for c in cfgs}
            best = min(t_triton, key=t_triton.get)
            winner = ("cublas", t_cublas) if t_cublas <= t_triton[best] else (f"triton {best}", t_triton[best])
            adb = D.quantize_double_block(a)
            bdb = D.quantize_double_block(b)
            t_db_exact = time_cuda(lambda: D.matmul(adb, bdb, "exact", out_dtype=torch.bfloat16))
            t_db_bf16 = time_cuda(lambda: D.matmul(adb, bdb, "bf16", out_dtype=torch.bfloat16))
            log(f"| {name} {gemm_name} ({m_} x {n_} x {k_}) | {t_bf16:.3f} | {t_cublas:.3f} | "
                + " | ".join(f"{t_triton[c]:.3f}" for c in cfgs)
                + f" | {winner[0]}: {winner[1] / t_bf16:.2f}x | {t_db_exact:.3f} | {t_db_bf16:.3f} |")
            RESULTS.setdefault("gemm", []).append(dict(
                shapes=label, linear=name, gemm=gemm_name, m=m_, n=n_, k=k_, bf16_ms=t_bf16, cublas_ms=t_cublas,
                triton_ms=t_triton, winner=winner[0], db_exact_ms=t_db_exact, db_bf16_ms=t_db_bf16))
            del a, b, aq, bq, adb, bdb
            empty_cache()


@guarded("overhead")
def host_overhead(tokens, shapes, label, host_tokens=256):
    """Is a model's linear work bound by the host? Per fwd+bwd of the block's four linears: GPU time
    (events) at the model's tokens per micro-batch, and host time: calls issued back to back without
    a sync at `host_tokens`, so small that the GPU never holds the host back (at the model's size a
    full launch queue would make the host wait and read as GPU time). Host > GPU: host-bound."""
    from torch.profiler import ProfilerActivity, profile
    log(f"\n### Host overhead, {label} linears (sum over the block's four): GPU at T={tokens}, "
        f"host at T={host_tokens}\n")
    log("| recipe | GPU ms (events) | host ms per call | host / GPU | kernels launched |")
    log("|---|---|---|---|---|")
    for r in RECIPES:
        recipe = None if r == "bf16" else load_recipe(r)
        gpu = host = 0.0
        launches = 0
        for name, k, n in shapes:
            for what, t in (("gpu", tokens), ("host", host_tokens)):
                x = randn(t, k, 10).requires_grad_(True)
                w = (randn(n, k, 11) * 0.02).requires_grad_(True)
                dy = randn(t, n, 12) * 1e-3
                step = _linear_step(recipe, x, w, dy, derive_key(1234, 0, 1, 0))
                if what == "gpu":
                    gpu += time_cuda(step, warmup=3, reps=20)
                    continue
                host += host_issue_ms(step, dryrun=DRYRUN)
                if not DRYRUN:
                    with profile(activities=[ProfilerActivity.CUDA]) as prof:
                        step()
                        torch.cuda.synchronize()
                    launches += sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")
        log(f"| {r} | {gpu:.3f} | {host:.3f} | {host / gpu:.2f} | {launches} |")
        RESULTS.setdefault("overhead", []).append(dict(recipe=r, label=label, tokens=tokens, gpu_ms=gpu,
                                                       host_tokens=host_tokens, host_ms=host, launches=launches))


def agreement(recipe, x, w, dy, key):
    """Kernel path vs reference path on the same inputs and key: Y exact (same codes, same GEMM),
    dX and dW equal up to the rotation's FP32 rounding (so rare differing codes/scales)."""
    outs = []
    for reference in (True, False):
        x.grad = w.grad = None
        with D.reference_only() if reference else contextlib.nullcontext():
            y = nvfp4_linear(x, w, None, recipe, QuantContext(key=key, seed=recipe.seed))
            y.backward(dy)
        outs.append((y.detach().float(), x.grad.float(), w.grad.float()))
    (y0, dx0, dw0), (y1, dx1, dw1) = outs
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    log(f"\nkernel vs reference path (down proj): Y identical elements {((y0 == y1).float().mean().item()):.6f}, "
        f"rel diff Y {rel(y1, y0):.1e}, dX {rel(dx1, dx0):.1e}, dW {rel(dw1, dw0):.1e}\n")
    RESULTS["agreement"] = dict(y_equal_frac=(y0 == y1).float().mean().item(), y=rel(y1, y0),
                                dx=rel(dx1, dx0), dw=rel(dw1, dw0))


def _mm_fp32(a, b):
    """a @ b^T with FP32 output (BF16 operands on CUDA; the CPU dry run has no out_dtype overload)."""
    return torch.mm(a, b.t(), out_dtype=torch.float32) if a.is_cuda else torch.mm(a.float(), b.float().t())


@guarded("stages")
def stages(tokens, k, n):
    """Cost of each pass of the kernel path for one linear (leaving stages out = subtracting rows)."""
    x = randn(tokens, k, 20)
    w = randn(n, k, 21) * 0.02
    dy = randn(tokens, n, 22) * 1e-3
    sigma = random_signs(derive_key(7, 5), 128, DEV)
    st = RandomStream(derive_key(8, 3))
    xq = quantize_nvfp4_rtn(x, smax=256.0, four_over_six=True)
    wq = quantize_nvfp4_rtn(w, smax=256.0, four_over_six=True)
    eq = rht_ms_eden(dy, sigma, st)
    wtq = rht_ms_eden(None, sigma, st, packed=wq)
    etq = rht_ms_eden(dy, sigma, st, transpose=True)
    xtq = rht_ms_eden(None, sigma, st, packed=xq)
    xb, wb = x, w
    rows = [
        ("BF16 fprop GEMM", lambda: torch.mm(xb, wb.t())),
        ("BF16 dgrad GEMM", lambda: torch.mm(dy, wb)),
        ("BF16 wgrad GEMM", lambda: torch.mm(dy.t(), xb)),
        ("quantize X (RTN+4/6)", lambda: quantize_nvfp4_rtn(x, smax=256.0, four_over_six=True)),
        ("quantize W (RTN+4/6)", lambda: quantize_nvfp4_rtn(w, smax=256.0, four_over_six=True)),
        ("E: RHT+EDEN row-major", lambda: rht_ms_eden(dy, sigma, st)),
        ("W^T: re-quantize from packed", lambda: rht_ms_eden(None, sigma, st, packed=wq)),
        ("E^T: RHT+EDEN transposed", lambda: rht_ms_eden(dy, sigma, st, transpose=True)),
        ("X^T: re-quantize from packed", lambda: rht_ms_eden(None, sigma, st, packed=xq)),
        ("fprop: dequant X,W + mm fp32 out + g (recipe.py today)", lambda: D.matmul(xq, wq)),
        ("fprop: dequant X,W + mm + fused g/cast epilogue (bf16 out)", lambda: D.matmul(xq, wq, out_dtype=torch.bfloat16)),
        ("dgrad: dequant + mm + fused epilogue", lambda: D.matmul(eq, wtq, scale=wq.tensor_scale, out_dtype=torch.bfloat16)),
        ("wgrad: dequant + mm + fused epilogue", lambda: D.matmul(etq, xtq, scale=xq.tensor_scale, out_dtype=torch.bfloat16)),
        ("dgrad: mm alone on dequantized operands (fp32 out)",
         lambda: _mm_fp32(D.dequantize_unscaled(eq), D.dequantize_unscaled(wtq))),
        ("E: RHT+EDEN row-major, also writing the BF16 GEMM operand",
         lambda: rht_ms_eden(dy, sigma, st, emit_operand=True)),
        ("W^T: re-quantize from packed, also writing the BF16 GEMM operand",
         lambda: rht_ms_eden(None, sigma, st, packed=wq, emit_operand=True)),
        ("dequant E alone (what writing the operand replaces)", lambda: dequantize_unscaled_bf16(eq)),
        ("dequant X alone", lambda: dequantize_unscaled_bf16(xq)),
    ]
    log(f"\n### Where the time goes, one linear T={tokens}, K={k}, N={n} (kernel path)\n")
    log("| stage | median ms |")
    log("|---|---|")
    for label, fn in rows:
        t = time_cuda(fn, warmup=3, reps=20)
        log(f"| {label} | {t:.3f} |")
        RESULTS["stages"].append(dict(stage=label, ms=t))
    del x, w, dy
    empty_cache()


def save(out):
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(LINES) + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)
    if RESULTS["errors"]:
        with open(os.path.join(out, "errors.txt"), "w") as f:
            f.write("\n\n".join(RESULTS["errors"]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    ap.add_argument("--skip-linear", action="store_true")
    ap.add_argument("--results-md", default=None, metavar="FILE",
                    help="also put the whole table into FILE (e.g. docs/RESULTS.md) between "
                         "<!-- bench-kernels:begin --> and <!-- bench-kernels:end -->")
    ap.add_argument("--from-md", default=None, metavar="RESULTS_MD",
                    help="run nothing: put an earlier run's <out>/results.md into --results-md (runs made "
                         "on a lent device come back as files)")
    args = ap.parse_args()
    if args.from_md:
        if not args.results_md:
            ap.error("--from-md needs --results-md")
        publish(open(args.from_md).read(), args.results_md)
        return
    if not DRYRUN and not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (BENCH_DRYRUN=1 TRITON_INTERPRET=1 checks the script on CPU; "
                 "--from-md needs none)")
    os.makedirs(args.out, exist_ok=True)
    dev = "cpu (dry run)" if DRYRUN else torch.cuda.get_device_name()
    RESULTS["env"] = dict(device=dev, torch=torch.__version__, triton=triton.__version__,
                          python=platform.python_version(), cmd=" ".join(sys.argv))
    log(f"device: {dev}; torch {torch.__version__}; triton {triton.__version__}; python {platform.python_version()}")
    t0 = time.time()
    rows, cols = (2048, 1024) if args.quick else (16384, 4096)
    if DRYRUN:
        rows, cols = 128, 256
        global LLAMA7B
        LLAMA7B = [("tiny", 256, 384), ("down", 384, 256)]
        global LLAMA1B, QUALITY
        LLAMA1B = QUALITY = [("tiny", 256, 256)]

    def checkpoint():
        # elapsed time, and everything so far on disk: a run cut short by the device's time limit
        # keeps the sections it finished
        log(f"[{time.time() - t0:.0f}s]")
        save(args.out)

    # headline sections first (bandwidth, the 7B linear table), in case the run is cut short
    bandwidth(rows, cols)
    checkpoint()
    tokens = 2048 if args.quick else 16384
    if DRYRUN:
        tokens = 128
    if not args.skip_linear:
        linear_block(tokens, 10, LLAMA7B, "Llama-7B (hidden 4096, MLP 11008)")
        checkpoint()
    exactness(rows, cols)
    checkpoint()
    if not args.skip_linear:
        gemm_backends(tokens, LLAMA7B, "Llama-7B (hidden 4096, MLP 11008)")
        checkpoint()
        stages(tokens, 256, 384) if DRYRUN else stages(tokens, 4096, 11008)
        checkpoint()
        linear_block(tokens, 10, LLAMA1B, "Llama-1B-like (hidden 2048, MLP 5632)")
        checkpoint()
        host_overhead(128 if DRYRUN else 32768, QUALITY, "quality-benchmark model (hidden 256, MLP 768)")
        # the ~1B GPT step's micro-batch (2 x 2048 tokens): is its 2.13x bound by the host?
        host_overhead(128 if DRYRUN else 4096, LLAMA1B, "~1B GPT (hidden 2048, MLP 5632)")
        checkpoint()
    if args.results_md:
        publish("\n".join(LINES) + "\n", args.results_md)
    print("\n".join(LINES[-60:]))


def publish(table: str, results_md: str) -> None:
    """The benchmark's table into results_md between its markers (its first line names the device)."""
    if not table.startswith("device: "):
        raise ValueError("not a bench_kernels table: its first line must name the device")
    put_marked_block(results_md, "bench-kernels", table, "## Fused kernels: the benchmark's table")


if __name__ == "__main__":
    main()
