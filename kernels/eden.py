"""RHT-128 + MS-EDEN (per-128 correction) + scale SR + pack: the twin of
`quantizers.quantize_ms_eden(hadamard.rht(A, sigma), stream=..., eden_group=128)`.

The operand A [R, C] is rotated and quantized along C (a multiple of 128). Three source layouts:
- SRC_DENSE:    A is a row-major tensor (e.g. dY for dgrad, along N);
- SRC_DENSE_T:  A is the transpose of a row-major tensor (dY^T for wgrad, along T), read in tiles
                and transposed in registers, so no transposed copy is materialised;
- SRC_PACKED_T: A = dequantize_unscaled(P)^T for a packed 1x16 NVFP4 operand P (X̂^T, Ŵ^T):
                "re-quantize from packed FP4" — unpack, scale, transpose, rotate and quantize in
                one kernel; q*s is exact in BF16, so the rotation runs on BF16 tensor cores.

Rotation: z = (A ⊙ σ) H / sqrt(128) = A · (diag(σ) H±1) · fp32(1/sqrt(128)). The ±1 matrix is exact
in BF16, so tl.dot with FP32 accumulation gives every product exactly; FP32 sources are split into
three BF16 parts (hi + mid + lo == a exactly) so the rotation keeps FP32 accuracy. The reference
rotates with an FP32 matmul: the two agree to FP32 rounding (summation order), not bit for bit.
Everything after the rotation matches the reference bit for bit given the same z; the test twins
use `rht128()` below, which runs this very rotation code.

Two launches (the tensor scale needs the exact amax of the rotated tensor): pass 1 rotates and
reduces amax (and stores each 16-block's amax); pass 2 rotates again (same code, same bits) and
quantizes.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
import triton
import triton.language as tl

from megatron_fp4 import format as fmt
from megatron_fp4.quantizers import EDEN_V
from megatron_fp4.rng import RandomStream
from megatron_fp4.tensor import BLOCK, NVFP4Tensor

from .rtn import _amax_reduce_kernel
from ._common import (FP32_MIN_NORMAL, INTERPRET, block_values, div_prep, div_scalar, e2m1_value, e4m3_value,
                      exact_div, fp32_reciprocal, hash_uniform, pack_codes, rn_e2m1, rn_e2m1_code, rn_e4m3,
                      counter, dot_pm1, halve, signed_hadamard, stream_args, stream_key, sr_e4m3, tensor_scale, unpack_codes)

N_RHT = 128
# Variant switches (constexpr) for benchmarks/bench_variants.py; defaults = fastest bit-exact on H100
# (FAST_RN=1: EDEN needs the grid value as well as the code, and with both live the code-from-sum
# form (2) compiles to more instructions. BAMAX=True: pass 1 stores the 16-block amaxes and pass 2
# loads them, so the per-block work (three IEEE divisions, E4M3 rounding, hash, scale SR) runs in a
# compact layout instead of 4x replicated in the rotation's wgmma layout: 82.5 -> 55 instructions
# per element in pass 2, +2.4 in pass 1, for 0.5 extra bytes per element (benchmarks/sass_stats.py;
# chosen by instruction count, not yet timed on a GPU: bench_variants has the BAMAX=False row).
# TREE=True: the EDEN factor's two sums in the twin's fixed pairwise order, so the scales are
# bit-identical to quantizers.quantize_ms_eden on every device (with tl.sum's order, 5 of 4.2M scales
# differed on the H200); it costs 54.6 -> 56.9 instructions per element in pass 2 (sass_stats), not
# yet timed: bench_variants has the TREE=False row.)
DEFAULTS = dict(FAST_DIV=True, FAST_RN=1, AMAX_MODE=1, TILES=4, BAMAX=True, TREE=True)
SRC_DENSE, SRC_DENSE_T, SRC_PACKED_T = 0, 1, 2
INV_SQRT_128 = float(np.float32(1.0 / math.sqrt(N_RHT)))   # the entries of hadamard_matrix(128)


@triton.jit
def _load_h(h_ptr):
    # diag(sigma) H, entries +-1; loaded once per program (32 KB: re-loading it per 64-row tile
    # moved twice the tile's own bytes through L2)
    hr = tl.arange(0, 128)
    return tl.load(h_ptr + hr[:, None] * 128 + hr[None, :])


@triton.jit
def _load_rotate(src_ptr, ssc_ptr, stride_s, R, r0, c0, h, INV_SQRT,
                 SRC: tl.constexpr, SPLIT: tl.constexpr, INTERP: tl.constexpr, BR: tl.constexpr):
    """z [BR, 128] (FP32) = rotation of A[r0:r0+BR, c0:c0+128]; rows >= R come out as 0."""
    rows = r0 + tl.arange(0, BR)
    cols = c0 + tl.arange(0, 128)
    rmask = rows < R
    if SRC == 0:
        a = tl.load(src_ptr + rows[:, None].to(tl.int64) * stride_s + cols[None, :],
                    mask=rmask[:, None], other=0.0)
    elif SRC == 1:
        at = tl.load(src_ptr + cols[:, None].to(tl.int64) * stride_s + rows[None, :],
                     mask=rmask[None, :], other=0.0)               # [128, BR], coalesced along R
        a = tl.trans(at)
    else:
        # packed source P [C, R/2] and its E4M3 scale bytes [C, R/16]; A = (q*s)^T
        bcols = r0 // 2 + tl.arange(0, BR // 2)
        byte = tl.load(src_ptr + cols[:, None].to(tl.int64) * stride_s + bcols[None, :],
                       mask=(bcols < R // 2)[None, :], other=0)
        scols = r0 // 16 + tl.arange(0, BR // 16)
        sb = tl.load(ssc_ptr + cols[:, None].to(tl.int64) * (stride_s // 8) + scols[None, :],
                     mask=(scols < R // 16)[None, :], other=0)
        a = tl.trans(block_values(unpack_codes(byte, 128, BR), sb, 128, BR))
    z = dot_pm1(a, h, SPLIT, INTERP) * INV_SQRT                   # exact products, FP32 sums
    return tl.where(rmask[:, None], z, 0.0)


@triton.jit
def _rht_amax_kernel(src_ptr, ssc_ptr, stride_s, R, h_ptr, INV_SQRT, amax_bits_ptr, nonfinite_ptr, part_ptr,
                     bamax_ptr, C,
                     SRC: tl.constexpr, SPLIT: tl.constexpr, INTERP: tl.constexpr, BR: tl.constexpr,
                     PARTIALS: tl.constexpr, TILES: tl.constexpr, BAMAX: tl.constexpr = False):
    # BAMAX: also store every 16-block's amax of the (sanitised) rotation, FP32 [R, C/16], for pass 2
    c0 = tl.program_id(1) * 128
    h = _load_h(h_ptr)
    amax = 0.0
    bad = 0
    for t in range(TILES):                   # TILES row tiles per program share one load of h
        r0 = (tl.program_id(0) * TILES + t) * BR
        z = _load_rotate(src_ptr, ssc_ptr, stride_s, R, r0, c0, h, INV_SQRT, SRC, SPLIT, INTERP, BR)
        a = tl.abs(z)
        finite = a < float("inf")
        amax = tl.maximum(amax, tl.max(tl.max(tl.where(finite, a, 0.0), axis=1), axis=0))
        bad = tl.maximum(bad, tl.max(tl.max((~finite).to(tl.int32), axis=1), axis=0))
        if BAMAX:
            bam = tl.max(tl.reshape(tl.where(finite, a, 0.0), (BR, 8, 16)), axis=2)
            rows = r0 + tl.arange(0, BR)
            tl.store(bamax_ptr + rows[:, None].to(tl.int64) * (C // 16) + c0 // 16 + tl.arange(0, 8)[None, :],
                     bam, mask=(rows < R)[:, None])
    amax = amax.to(tl.int32, bitcast=True)
    if PARTIALS:
        # one word per program (no same-address atomics); rtn._amax_reduce_kernel folds them
        pid = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        tl.store(part_ptr + pid, amax | (bad << 31))   # sign bit: a non-finite
    else:
        tl.atomic_max(amax_bits_ptr, amax)
        tl.atomic_max(nonfinite_ptr, bad, mask=bad > 0)


@triton.jit
def _rht_store_kernel(src_ptr, ssc_ptr, stride_s, R, C, h_ptr, INV_SQRT, z_ptr,
                      SRC: tl.constexpr, SPLIT: tl.constexpr, INTERP: tl.constexpr, BR: tl.constexpr):
    # test/benchmark twin: the rotation alone, written as FP32
    r0 = tl.program_id(0) * BR
    c0 = tl.program_id(1) * 128
    z = _load_rotate(src_ptr, ssc_ptr, stride_s, R, r0, c0, _load_h(h_ptr), INV_SQRT, SRC, SPLIT, INTERP, BR)
    rows = r0 + tl.arange(0, BR)
    cols = c0 + tl.arange(0, 128)
    tl.store(z_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], z, mask=(rows < R)[:, None])


@triton.jit(do_not_specialize=["role"])
def _eden_kernel(src_ptr, ssc_ptr, stride_s, R, C, h_ptr, INV_SQRT, amax_bits_ptr, nonfinite_ptr,
                 packed_ptr, scales_ptr, gout_ptr, flushed_ptr, clamped_ptr, operand_ptr, bamax_ptr,
                 key, state_ptr, role, row_off, row_split, row_hi, col_off, col_split, col_hi, SMAX_V, V, INV_V,
                 SRC: tl.constexpr, SPLIT: tl.constexpr, INTERP: tl.constexpr,
                 TIES_AWAY: tl.constexpr, SCALAR_RECIP: tl.constexpr, BR: tl.constexpr,
                 FAST_DIV: tl.constexpr, FAST_RN: tl.constexpr, TILES: tl.constexpr,
                 EMIT: tl.constexpr = False, BAMAX: tl.constexpr = False, TREE: tl.constexpr = True,
                 NSTATE: tl.constexpr = 0, NROLE: tl.constexpr = 0):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    c0 = pid_c * 128
    g, valid = tensor_scale(amax_bits_ptr, nonfinite_ptr, gout_ptr, SMAX_V, (pid_r == 0) & (pid_c == 0))
    h = _load_h(h_ptr)
    key = stream_key(key, state_ptr, role, NSTATE, NROLE)   # the stream's device state folded in
    for t in range(TILES):                   # TILES row tiles per program share one load of h
        r0 = (pid_r * TILES + t) * BR
        _eden_tile(src_ptr, ssc_ptr, stride_s, R, C, h, INV_SQRT, g, valid, r0, c0,
                   packed_ptr, scales_ptr, flushed_ptr, clamped_ptr, operand_ptr, bamax_ptr, key, row_off,
                   row_split, row_hi, col_off, col_split, col_hi, V, INV_V,
                   SRC, SPLIT, INTERP, TIES_AWAY, SCALAR_RECIP, BR, FAST_DIV, FAST_RN, EMIT, BAMAX, TREE)


@triton.jit
def _pairwise_sum_128(x, BR: tl.constexpr):
    """[BR, 8, 16] -> [BR]: the sum over each row's 128 values as a halving tree (x[c] + x[c + 64],
    then c + 32, ..., c + 1), the order of quantizers.pairwise_sum. Each step is one IEEE add of two
    operands, which no reduction order or compiler can change (the kernel runs with FP contraction
    off), so the EDEN factor is bit-identical to the twin's on any device; tl.sum's order is the
    compiler's and differed from torch's in ~1 of 10^6 SR'd scales on the H200. (Halving rather than
    adjacent pairs: 56.9 instead of 68.6 instructions per element in pass 2, fewer layout shuffles.)
    Steps: _common.halve."""
    x = tl.reshape(x, (BR, 128))
    x = halve(halve(halve(x, BR, 128), BR, 64), BR, 32)
    x = halve(halve(halve(x, BR, 16), BR, 8), BR, 4)
    return halve(x, BR, 2)


@triton.jit
def _eden_tile(src_ptr, ssc_ptr, stride_s, R, C, h, INV_SQRT, g, valid, r0, c0,
               packed_ptr, scales_ptr, flushed_ptr, clamped_ptr, operand_ptr, bamax_ptr, key, row_off, row_split,
               row_hi, col_off, col_split, col_hi, V, INV_V,
               SRC: tl.constexpr, SPLIT: tl.constexpr, INTERP: tl.constexpr, TIES_AWAY: tl.constexpr,
               SCALAR_RECIP: tl.constexpr, BR: tl.constexpr, FAST_DIV: tl.constexpr, FAST_RN: tl.constexpr,
               EMIT: tl.constexpr, BAMAX: tl.constexpr, TREE: tl.constexpr):
    z = _load_rotate(src_ptr, ssc_ptr, stride_s, R, r0, c0, h, INV_SQRT, SRC, SPLIT, INTERP, BR)
    z = tl.where(tl.abs(z) < float("inf"), z, 0.0)               # non-finite -> 0 (g carries NaN)
    zb = tl.reshape(z, (BR, 8, 16))
    if BAMAX:   # pass 1's block amaxes, loaded in a compact layout (the reduction's is replicated)
        brows = r0 + tl.arange(0, BR)
        bamax = tl.load(bamax_ptr + brows[:, None].to(tl.int64) * (C // 16) + c0 // 16 + tl.arange(0, 8)[None, :],
                        mask=(brows < R)[:, None], other=0.0)
    else:
        bamax = tl.max(tl.abs(zb), axis=2)                        # [BR, 8]
    s = rn_e4m3(tl.math.div_rn(div_scalar(bamax, V, INV_V, SCALAR_RECIP), g))
    divisor = s * g
    keep = (s > 0) & (divisor >= FP32_MIN_NORMAL) & ((tl.zeros_like(s) + valid) > 0.5)
    safe = tl.where(keep, divisor, 1.0)
    if FAST_DIV:
        dn, p, rc = div_prep(safe)       # one true division per block, FMA-corrected per element
        u = exact_div(zb, dn[:, :, None], p[:, :, None], rc[:, :, None], INTERP)
    else:
        u = tl.math.div_rn(zb, safe[:, :, None])
    u = tl.where(keep[:, :, None], u, 0.0)
    if FAST_RN > 0:
        codes, q = rn_e2m1(u, TIES_AWAY, FAST_RN == 2)
    else:
        codes = rn_e2m1_code(u, TIES_AWAY)
        q = e2m1_value(codes)
    # EDEN factor per 128-group (one rotated chunk of one row): |u|^2 / <u, q>
    if TREE:    # the reference's fixed pairwise order (quantizers.pairwise_sum): same bits on every device
        num = _pairwise_sum_128(u * u, BR)
        den = _pairwise_sum_128(u * q, BR)
    else:       # tl.sum's own order: the last bits of the factor can differ from the twin's
        num = tl.sum(tl.reshape(u * u, (BR, 128)), axis=1)
        den = tl.sum(tl.reshape(u * q, (BR, 128)), axis=1)
    ok = den >= FP32_MIN_NORMAL
    factor = tl.where(ok, tl.math.div_rn(num, tl.where(ok, den, 1.0)), 1.0)
    corrected = s * factor[:, None]
    clamped = tl.sum(tl.sum((corrected > 448.0).to(tl.int32), axis=1), axis=0)
    # scale SR: one uniform per 16-block, counter (global row, global column of the block start)
    rows = r0 + tl.arange(0, BR)
    hi = counter(rows, row_off, row_split, row_hi)
    lo = counter(c0 + tl.arange(0, 8) * 16, col_off, col_split, col_hi)
    uni = hash_uniform(key, hi[:, None], lo[None, :])
    sbits = tl.where(keep, sr_e4m3(corrected, uni), 0)
    flushed = tl.sum(tl.sum(((~keep) & (bamax > 0)).to(tl.int32), axis=1), axis=0)
    tl.atomic_add(flushed_ptr, flushed, mask=flushed > 0)
    tl.atomic_add(clamped_ptr, clamped, mask=clamped > 0)
    rmask = (rows < R)[:, None]
    packed = pack_codes(tl.reshape(codes, (BR, 128)), BR, 128)
    pcols = c0 // 2 + tl.arange(0, 64)
    tl.store(packed_ptr + rows[:, None].to(tl.int64) * (C // 2) + pcols[None, :], packed, mask=rmask)
    scols = c0 // 16 + tl.arange(0, 8)
    tl.store(scales_ptr + rows[:, None].to(tl.int64) * (C // 16) + scols[None, :], sbits, mask=rmask)
    if EMIT:
        # the GEMM operand e2m1(q) * e4m3(s) in BF16 (exact), so the consumer skips the dequant pass
        vals = tl.reshape(tl.reshape(q, (BR, 8, 16)) * e4m3_value(sbits)[:, :, None], (BR, 128))
        ocols = c0 + tl.arange(0, 128)
        tl.store(operand_ptr + rows[:, None].to(tl.int64) * C + ocols[None, :], vals.to(tl.bfloat16), mask=rmask)


def _source(a: Optional[torch.Tensor], packed: Optional[NVFP4Tensor], transpose: bool):
    """(src, scale bytes, row stride, R, C, SRC mode, SPLIT) of the logical operand A [R, C]."""
    if packed is not None:
        if packed.block_rows != 1 or packed.outer_scales is not None:
            raise ValueError("re-quantize from packed needs a 1x16 per-tensor-scaled operand")
        src = packed.packed.contiguous()
        sc = packed.block_scales.view(torch.uint8).contiguous()
        c, half_r = src.shape
        return src, sc, half_r, half_r * 2, c, SRC_PACKED_T, 1
    if a.stride(-1) != 1:
        a = a.contiguous()
    split = 1 if a.dtype == torch.bfloat16 else 3
    if transpose:
        c, r = a.shape
        return a, a, a.stride(0), r, c, SRC_DENSE_T, split
    r, c = a.shape
    return a, a, a.stride(0), r, c, SRC_DENSE, split


def _launch_config(mode, block_r, num_warps):
    # BR=64 / 4 warps was the fastest of {32,64,128} x {4,8} on H100 for all three sources (bench sweep)
    return (block_r or 64), (num_warps or 4)


def rht128(a=None, sigma=None, *, transpose=False, packed=None, block_r=None, num_warps=None):
    """The kernel's rotation alone, as FP32 [R, C]: twin of hadamard.rht(A, sigma)."""
    src, sc, stride, rows, cols, mode, split = _source(a, packed, transpose)
    if cols % N_RHT:
        raise ValueError(f"the rotated dim ({cols}) must be a multiple of 128")
    block_r, num_warps = _launch_config(mode, block_r, num_warps)
    h = signed_hadamard(sigma, src.device, N_RHT)
    z = torch.empty(rows, cols, dtype=torch.float32, device=src.device)
    grid = (triton.cdiv(rows, block_r), cols // N_RHT)
    _rht_store_kernel[grid](src, sc, stride, rows, cols, h, INV_SQRT_128, z, SRC=mode, SPLIT=split,
                            INTERP=INTERPRET, BR=block_r, num_warps=num_warps, enable_fp_fusion=False)
    return z


def rht_ms_eden(
    a: Optional[torch.Tensor] = None,
    sigma: Optional[torch.Tensor] = None,
    stream: Optional[RandomStream] = None,
    *,
    transpose: bool = False,
    packed: Optional[NVFP4Tensor] = None,
    v: float = EDEN_V,
    smax: float = 255.99,
    ties: str = fmt.TIES_EVEN,
    amax_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    block_r: Optional[int] = None,
    num_warps: Optional[int] = None,
    variant: Optional[dict] = None,
    amax_only: bool = False,
    emit_operand: bool = False,
) -> NVFP4Tensor:
    """MS-EDEN (per-128) of A after RHT-128 with signs sigma, A along its last dim, where A is
    `a`, `a.t()` (transpose=True) or `packed.dequantize_unscaled().t()` (packed=...).

    Twin: quantizers.quantize_ms_eden(hadamard.rht(A, sigma), stream=stream, eden_group=128, v, smax,
    ties, amax_reduce). Scale-SR counters are (stream.row_offset + row, stream.col_offset + column).
    emit_operand: also write the GEMM operand dequantize_unscaled() in BF16 (exact) into the result's
    `operand`, for a consumer that would otherwise run the dequant kernel next.
    """
    if stream is None:
        raise ValueError("MS-EDEN needs a RandomStream for the scale SR")
    if ties not in (fmt.TIES_EVEN, fmt.TIES_AWAY):
        raise ValueError(f"rtn_ties must be 'even' or 'away', got {ties!r}")
    src, sc, stride, rows, cols, mode, split = _source(a, packed, transpose)
    if cols % N_RHT:
        raise ValueError(f"the rotated dim ({cols}) must be a multiple of 128")
    block_r, num_warps = _launch_config(mode, block_r, num_warps)
    dev = src.device
    h = signed_hadamard(sigma, dev, N_RHT)
    grid = (triton.cdiv(rows, block_r), cols // N_RHT)
    common = dict(SRC=mode, SPLIT=split, INTERP=INTERPRET, BR=block_r, num_warps=num_warps,
                  enable_fp_fusion=False)
    var = dict(DEFAULTS, **(variant or {}))
    partials = bool(var.pop("AMAX_MODE"))
    tiles = var["TILES"]
    grid = (triton.cdiv(rows, block_r * tiles), cols // N_RHT)
    nparts = grid[0] * grid[1]
    if partials:
        buf = torch.empty(nparts + 2, dtype=torch.int32, device=dev)     # written in full: no memset
        parts, amax_bits, nonfinite = buf[:nparts], buf[nparts:nparts + 1], buf[nparts + 1:]
    else:   # one memset for the amax word, the non-finite flag and pass 2's two counters
        buf = torch.zeros(4, dtype=torch.int32, device=dev)
        parts, amax_bits, nonfinite = buf, buf[0:1], buf[1:2]
    use_bamax = bool(var.pop("BAMAX"))
    bamax = torch.empty(rows, cols // BLOCK, dtype=torch.float32, device=dev) if use_bamax else parts
    _rht_amax_kernel[grid](src, sc, stride, rows, h, INV_SQRT_128, amax_bits, nonfinite, parts, bamax, cols,
                           PARTIALS=partials, TILES=tiles, BAMAX=use_bamax, **common)
    if partials:
        _amax_reduce_kernel[(1,)](parts, nparts, amax_bits, nonfinite, BLOCK=1024, num_warps=4)
    if amax_only:                        # benchmarks: time pass 1 alone (leave-one-stage-out)
        return amax_bits
    if amax_reduce is not None:
        amax_bits = amax_reduce(amax_bits.view(torch.float32)).reshape(1).view(torch.int32)
    packed_out = torch.empty(rows, cols // 2, dtype=torch.uint8, device=dev)
    scales = torch.empty(rows, cols // BLOCK, dtype=torch.uint8, device=dev)
    g = torch.empty(1, dtype=torch.float32, device=dev)
    counters = torch.zeros(2, dtype=torch.int32, device=dev) if partials else buf[2:4]
    operand = torch.empty(rows, cols, dtype=torch.bfloat16, device=dev) if emit_operand else None
    key_args, key_meta = stream_args(stream, counters)
    _eden_kernel[grid](src, sc, stride, rows, cols, h, INV_SQRT_128, amax_bits, nonfinite,
                       packed_out, scales, g, counters[0:1], counters[1:2],
                       operand if emit_operand else packed_out, bamax,
                       *key_args, *stream.kernel_offsets(),
                       float(smax * v), float(v), fp32_reciprocal(v),
                       TIES_AWAY=(ties == fmt.TIES_AWAY), SCALAR_RECIP=False, EMIT=emit_operand, BAMAX=use_bamax,
                       **key_meta, **common, **var)
    return NVFP4Tensor(packed=packed_out, block_scales=scales.view(torch.float8_e4m3fn),
                       tensor_scale=g.reshape(()), flushed_blocks=counters[0], clamped_scales=counters[1],
                       operand=operand)
