"""Fused 1x16 RTN NVFP4 quantize (+ optional 4/6) with packing: the twin of
`quantizers.quantize_nvfp4(x, mode="rn", block_rows=1, ...)`.

Two launches per operand:
1. `_amax_kernel`: one read of x; the finite tensor amax (as int32 bits, so a plain integer
   atomic_max orders non-negative floats) and a non-finite flag.
2. `_rtn_kernel`: one read of x, writes packed codes, E4M3 scale bytes, the FP32 tensor scale and
   the flushed-block count. An optional TP amax all-reduce runs between the two.

The per-tensor scale g depends on the exact amax of the whole tensor, so the data is read twice; the
floor counted in the benchmark is one read.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from megatron_fp4 import format as fmt
from megatron_fp4.tensor import BLOCK, NVFP4Tensor

from megatron_fp4.rng import RandomStream

from ._common import (FP32_MIN_NORMAL, INTERPRET, div_prep, div_scalar, e2m1_value, e4m3_bits, exact_div,
                      counter, fp32_reciprocal, halve, hash_uniform, pack_codes, rn_e2m1, rn_e2m1_code, rn_e4m3, stream_args, stream_key,
                      sr_e2m1, tensor_scale)

AMAX_BLOCK = 8192
RTN_CONFIG = (32, 128, 4)      # block_r, block_c, num_warps of quantize_nvfp4_rtn's programs by default,
TILE46_CONFIG = (16, 128, 4)   # and of 16x16 tiles with 4/6 (why: quantize_nvfp4_rtn)
AMAX_TILES = 1      # tiles of AMAX_BLOCK per program of the amax pass (tools/bench_variants: amax rows)

# Variant switches (constexpr), kept so benchmarks/bench_variants.py can time leave-one-out variants;
# FAST_RN: 0 midpoint compares, 1 FP32-RNE value then decoded, 2 code read off the RNE sum. Without
# 4/6 the default is 2 (the grid value is not needed; 4 instead of 36 quarter-rate float-to-int
# conversions per thread, same instruction count: benchmarks/sass_stats.py; not yet timed on a GPU);
# with 4/6 it is 1 (the SSEs need the values, and keeping both live made the compiler spill).
# The other defaults are the fastest bit-exact choice in two H100 runs (docs/RESULTS_kernels.md): the
# partial-amax buffer (AMAX_MODE=1) and the 3-D tile load were slower for 4/6 in both runs, so RTN
# keeps one atomic per program, and LOAD3D is used without 4/6 only.
DEFAULTS = dict(FAST_DIV=True, FAST_RN=2, SSE_MODE=1, LOAD3D=True, AMAX_MODE=0)


@triton.jit
def _amax_kernel(x_ptr, n, amax_bits_ptr, nonfinite_ptr, part_ptr, BLOCK_N: tl.constexpr,
                 PARTIALS: tl.constexpr, TILES: tl.constexpr = 1):
    # TILES tiles per program, unrolled (all their loads in flight at once), folded elementwise, then
    # one reduction; PARTIALS: each program writes its own word (no same-address atomics), and
    # _amax_reduce_kernel folds them; else one atomic per program on the result word
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    bad_acc = tl.zeros([BLOCK_N], dtype=tl.int32)
    for t in tl.static_range(TILES):
        offs = (pid.to(tl.int64) * TILES + t) * BLOCK_N + tl.arange(0, BLOCK_N)
        a = tl.abs(tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32))
        finite = a < float("inf")                      # false for +-Inf and NaN
        acc = tl.maximum(acc, tl.where(finite, a, 0.0))
        bad_acc = tl.maximum(bad_acc, (~finite).to(tl.int32))
    amax = tl.max(acc, 0).to(tl.int32, bitcast=True)   # >= 0 floats order as ints
    bad = tl.max(bad_acc, 0)
    if PARTIALS:
        tl.store(part_ptr + pid, amax | (bad << 31))   # sign bit: this program's tiles held a non-finite
    else:
        tl.atomic_max(amax_bits_ptr, amax)
        tl.atomic_max(nonfinite_ptr, bad, mask=bad > 0)


@triton.jit
def _amax_reduce_kernel(part_ptr, nparts, amax_bits_ptr, nonfinite_ptr, BLOCK: tl.constexpr):
    # second level of the amax: partial words = finite amax bits, sign bit set if the tile held a non-finite
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, nparts, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        w = tl.load(part_ptr + offs, mask=offs < nparts, other=0)
        acc = tl.maximum(acc, w & 0x7FFFFFFF)
        bad = tl.maximum(bad, (w < 0).to(tl.int32))
    tl.store(amax_bits_ptr, tl.max(acc, 0))
    tl.store(nonfinite_ptr, tl.max(bad, 0))


@triton.jit
def _candidate(xb, bamax, g, valid, target, inv_target, TIES_AWAY: tl.constexpr,
               SCALAR_RECIP: tl.constexpr, FAST_DIV: tl.constexpr, FAST_RN: tl.constexpr,
               INTERP: tl.constexpr):
    """One scale candidate: (scale value, keep mask [BR, NB], codes, grid values [BR, NB, 16])."""
    s = rn_e4m3(tl.math.div_rn(div_scalar(bamax, target, inv_target, SCALAR_RECIP), g))
    divisor = s * g
    keep = (s > 0) & (divisor >= FP32_MIN_NORMAL) & ((tl.zeros_like(s) + valid) > 0.5)
    safe = tl.where(keep, divisor, 1.0)
    if FAST_DIV:
        dn, p, r = div_prep(safe)
        y = exact_div(xb, dn[:, :, None], p[:, :, None], r[:, :, None], INTERP)
    else:
        y = tl.math.div_rn(xb, safe[:, :, None])
    y = tl.where(keep[:, :, None], y, 0.0)
    if FAST_RN > 0:
        codes, vals = rn_e2m1(y, TIES_AWAY, FAST_RN == 2)
    else:
        codes = rn_e2m1_code(y, TIES_AWAY)
        vals = e2m1_value(codes)
    s = tl.where(keep, s, 0.0)
    return s, keep, codes, vals, y


@triton.jit
def _halving_sum_16(x, BR: tl.constexpr, NB: tl.constexpr):
    """[BR, NB, 16] -> [BR, NB]: each block's 16 values summed as the halving tree of
    quantizers.pairwise_sum (x[c] + x[c + 8], then + 4, + 2, + 1): one IEEE add per step, so the
    result does not depend on the compiler's reduction order."""
    x = tl.reshape(x, (BR * NB, 16))
    x = halve(halve(halve(halve(x, BR * NB, 16), BR * NB, 8), BR * NB, 4), BR * NB, 2)
    return tl.reshape(x, (BR, NB))


@triton.jit
def _sse64(x64, vals, s, g64, BR: tl.constexpr, NB: tl.constexpr):
    # the deciding sums, quantizers.four_over_six_sse: errors against the original values,
    # x - (e2m1 * e4m3) * g, every step exact in FP64 (the product has <= 30 significant bits, the
    # difference <= ~33), so any device gets the same errors; the squares round once and are added in
    # the twin's fixed order (FP contraction off: no DFMA), so the 4/6 choice is the twin's bit for bit
    e = x64 - (vals * s[:, :, None]).to(tl.float64) * g64
    return _halving_sum_16(e * e, BR, NB)


@triton.jit
def _tile_sum_16(x, BR: tl.constexpr, NB: tl.constexpr):
    """[BR, NB] per-row block sums -> [BR // 16, NB] per-16x16-tile sums, the rows added in the halving
    tree of quantizers.pairwise_sum (row r + row r + 8, then + 4, + 2, + 1): the twin's four_over_six_sse
    sums a tile's columns first, then its rows, both in that tree."""
    # as [tiles, 16 rows x NB] (row-major), one halving step adds row r and row r + 8 of each column,
    # the next r and r + 4, ...: no permute of the tile (Triton 3.6 lowered the [tiles, 16, NB] -> [tiles,
    # NB, 16] permute of these FP64 sums through local memory: ~1,400 spill instructions, 59 ms a
    # [16384 x 4096] operand on the H100)
    T: tl.constexpr = BR // 16
    x = tl.reshape(x, (T, 16 * NB))
    return tl.reshape(halve(halve(halve(halve(x, T, 16 * NB), T, 8 * NB), T, 4 * NB), T, 2 * NB), (T, NB))


@triton.jit
def _tile4_fp64(xb, g, vals4, s4, vals, s, BR: tl.constexpr, NB: tl.constexpr):
    """Per 16x16 tile: does "max->4" win on the tile's 256 FP64 squared errors (the twin's choice)?"""
    x64 = xb.to(tl.float64)
    g64 = g.to(tl.float64)
    return _tile_sum_16(_sse64(x64, vals4, s4, g64, BR, NB), BR, NB) < \
        _tile_sum_16(_sse64(x64, vals, s, g64, BR, NB), BR, NB)


@triton.jit
def _x_over_g(xb, g, FAST_DIV: tl.constexpr, INTERP: tl.constexpr):
    """x / g correctly rounded (the 4/6 screens' units): the fast exact division or IEEE div_rn."""
    if FAST_DIV:
        gdn, gp, grc = div_prep(g)
        return exact_div(xb, gdn, gp, grc, INTERP)
    else:
        return tl.math.div_rn(xb, g)


@triton.jit
def _sse32(xg, vals, s):
    # the FP32 screen, in units of g (x / g <= 1536: no overflow), any order: see the bound at its use
    e = xg - vals * s[:, :, None]
    return tl.sum(e * e, axis=2)


@triton.jit(do_not_specialize=["role"])
def _rtn_kernel(x_ptr, stride_r, R, C, amax_bits_ptr, nonfinite_ptr,
                packed_ptr, scales_ptr, gout_ptr, flushed_ptr, operand_ptr,
                SMAX_V, V, INV_V, key, state_ptr, role, row_off, row_split, row_hi, col_off, col_split, col_hi,
                SR: tl.constexpr, FOUR_SIX: tl.constexpr, TIES_AWAY: tl.constexpr, SCALAR_RECIP: tl.constexpr,
                BR: tl.constexpr, BC: tl.constexpr, FAST_DIV: tl.constexpr, FAST_RN: tl.constexpr,
                SSE_MODE: tl.constexpr, LOAD3D: tl.constexpr, INTERP: tl.constexpr,
                TILE16: tl.constexpr = False, EMIT: tl.constexpr = False, NSTATE: tl.constexpr = 0,
                NROLE: tl.constexpr = 0):
    # TILE16: 16x16 scale tiles (NVIDIA's weights): the block amax is the tile's, every row of a tile
    # computes the same scale, and only the tile's first row stores it and counts a flushed tile
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    NB: tl.constexpr = BC // 16
    g, valid = tensor_scale(amax_bits_ptr, nonfinite_ptr, gout_ptr, SMAX_V,
                             (pid_r == 0) & (pid_c == 0))
    rows = pid_r * BR + tl.arange(0, BR)
    rmask = rows < R
    r64 = rows.to(tl.int64)
    if LOAD3D:
        # address the tile as [BR, NB, 16] directly: a 16-block stays inside one thread (or two
        # neighbouring lanes), so no layout conversion is needed for the block reductions
        bcol = pid_c * NB + tl.arange(0, NB)
        k16 = tl.arange(0, 16)
        mask3 = rmask[:, None, None] & (bcol < C // 16)[None, :, None]
        offs = r64[:, None, None] * stride_r + (bcol * 16)[None, :, None] + k16[None, None, :]
        xb = tl.load(x_ptr + offs, mask=mask3, other=0.0).to(tl.float32)
    else:
        cols = pid_c * BC + tl.arange(0, BC)
        mask = rmask[:, None] & (cols[None, :] < C)
        x = tl.load(x_ptr + r64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        xb = tl.reshape(x, (BR, NB, 16))
    xb = tl.where(tl.abs(xb) < float("inf"), xb, 0.0)         # non-finite -> 0 (g carries the NaN)
    bamax = tl.max(tl.abs(xb), axis=2)
    if TILE16:
        tile_amax = tl.max(tl.reshape(bamax, (BR // 16, 16, NB)), axis=1)
        bamax = tl.reshape(tl.broadcast_to(tile_amax[:, None, :], (BR // 16, 16, NB)), (BR, NB))
    s, keep, codes, vals, y = _candidate(xb, bamax, g, valid, V, INV_V, TIES_AWAY, SCALAR_RECIP,
                                         FAST_DIV, FAST_RN, INTERP)
    if SR:
        # NVIDIA's SR4 elements (4/6 excluded by the caller): one uniform per element, counter
        # (global row, global column) = RandomStream.uniform, same rule as the double-block kernel
        bcols = pid_c * NB + tl.arange(0, NB)
        hi = counter(rows, row_off, row_split, row_hi)
        lo = counter((bcols * 16)[:, None] + tl.arange(0, 16)[None, :], col_off, col_split, col_hi)
        k = stream_key(key, state_ptr, role, NSTATE, NROLE)   # the stream's device state folded in
        codes = sr_e2m1(y, hash_uniform(k, hi[:, None, None], lo[None, :, :]))
        if EMIT:
            vals = e2m1_value(codes)
    if FOUR_SIX:
        # "max->4" candidate; keep the lower SSE against the original values, ties to "max->6".
        # Exact ties are common (s4 == 1.5*s6 puts both candidates on shared grid points): identical
        # candidates have identical exact errors, hence identical FP64 sums (_sse64, the twin's).
        # SSE_MODE 1 first compares FP32 sums S' in units of g and redoes in FP64 only tiles holding
        # a block where they are close. Not close means |S4' - S6'| > C with
        #   C = 2^-18 (S4' + S6') + 2^-21 A' + 2^-100,   A' = FP32 sum of (x/g)^2 over the block,
        # and then the FP64 choice is the screen's: with u = 2^-24, x/g is within one ulp (2u) and
        # its difference with the grid value, the square and each of the 15 adds (any order) round
        # once, so per candidate |S' - T| <= 20.2 u S' + 2.03 u sum (x/g)^2 + 2^-103 for the exact
        # T = sum t^2, t = x/g - q s (the cross term 4 u |t| |x/g| <= 2 u (t^2 + (x/g)^2)); the
        # 2^-126 absolute terms (subnormal or flushed results) stay below 2^-103; and the FP64 sums
        # are within 2^-48 of g^2 T. C is about twice the two candidates' bounds together.
        # SSE_MODE 0: always FP64; 2: the FP32 screen alone (not bit-exact, for timing only).
        s4, keep4, codes4, vals4, _ = _candidate(xb, bamax, g, valid, 4.0, 0.25, TIES_AWAY, SCALAR_RECIP,
                                              FAST_DIV, FAST_RN, INTERP)
        if TILE16:
            # 16x16 tiles (NVIDIA's weights with 4/6): one choice per tile, the twin's on its 256 FP64
            # squared errors summed in its order (columns, then rows). SSE_MODE 1 screens with FP32 tile
            # sums first, as for 1x16 blocks, with the bound widened to 256 terms: the 255 adds (any
            # order) give 255 u S' instead of 15 u S', so per candidate |S' - T| <= 260.2 u S' + 2.03 u
            # A' + 2^-103, and C = 2^-13 (S4' + S6') + 2^-20 A' + 2^-100 is about twice (S') and four
            # times (A') the two candidates' bounds together (the FP64 sums' own 2^-45 are far below).
            # Tiles whose candidates coincide (equal scales in all 16 rows, e.g. all-zero tiles) keep
            # "max->6" without a redo: identical candidates have identical FP64 sums.
            T: tl.constexpr = BR // 16
            same = tl.min(tl.reshape((s4 == s).to(tl.int32), (T, 16, NB)), axis=1) > 0
            if SSE_MODE == 0:
                tile4 = _tile4_fp64(xb, g, vals4, s4, vals, s, BR, NB)
            else:
                xg = _x_over_g(xb, g, FAST_DIV, INTERP)
                t4 = tl.sum(tl.reshape(_sse32(xg, vals4, s4), (T, 16, NB)), axis=1)
                t6 = tl.sum(tl.reshape(_sse32(xg, vals, s), (T, 16, NB)), axis=1)
                tile4 = (t4 < t6) & (~same)
                if SSE_MODE == 1:
                    a2 = tl.sum(tl.reshape(tl.sum(xg * xg, axis=2), (T, 16, NB)), axis=1)
                    close = (tl.abs(t4 - t6) <= (t4 + t6) * (2.0 ** -13) + a2 * (2.0 ** -20) + 2.0 ** -100) & (~same)
                    if tl.max(tl.max(close.to(tl.int32), axis=1), axis=0) > 0:
                        tile4 = _tile4_fp64(xb, g, vals4, s4, vals, s, BR, NB)
            use4 = tl.reshape(tl.broadcast_to(tile4[:, None, :], (T, 16, NB)), (BR, NB))
        elif SSE_MODE == 0:
            x64 = xb.to(tl.float64)
            g64 = g.to(tl.float64)
            use4 = _sse64(x64, vals4, s4, g64, BR, NB) < _sse64(x64, vals, s, g64, BR, NB)
        else:
            xg = _x_over_g(xb, g, FAST_DIV, INTERP)
            sse4 = _sse32(xg, vals4, s4)
            sse6 = _sse32(xg, vals, s)
            use4 = sse4 < sse6
            if SSE_MODE == 1:
                a2 = tl.sum(xg * xg, axis=2)
                close = tl.abs(sse4 - sse6) <= (sse4 + sse6) * (2.0 ** -18) + a2 * (2.0 ** -21) + 2.0 ** -100
                if tl.max(tl.max(close.to(tl.int32), axis=1), axis=0) > 0:
                    x64 = xb.to(tl.float64)
                    g64 = g.to(tl.float64)
                    use4 = _sse64(x64, vals4, s4, g64, BR, NB) < _sse64(x64, vals, s, g64, BR, NB)
        s = tl.where(use4, s4, s)
        codes = tl.where(use4[:, :, None], codes4, codes)
        keep = tl.where(use4, keep4, keep)
        if EMIT:
            vals = tl.where(use4[:, :, None], vals4, vals)
    if EMIT:
        # the GEMM operand e2m1(q) * e4m3(s) in BF16 (exact; s = 0 on flushed blocks), so the consumer
        # skips the dequant pass
        operand = (vals * s[:, :, None]).to(tl.bfloat16)
        ocol = pid_c * NB + tl.arange(0, NB)
        ooffs = r64[:, None, None] * C + (ocol * 16)[None, :, None] + tl.arange(0, 16)[None, None, :]
        tl.store(operand_ptr + ooffs, operand,
                 mask=rmask[:, None, None] & (ocol < C // 16)[None, :, None])
    counted = (~keep) & (bamax > 0)
    if TILE16:
        counted = counted & ((rows % 16) == 0)[:, None]
    flushed = tl.sum(tl.sum(counted.to(tl.int32), axis=1), axis=0)
    tl.atomic_add(flushed_ptr, flushed, mask=flushed > 0)
    scols = pid_c * NB + tl.arange(0, NB)
    if LOAD3D:
        even, odd = tl.split(tl.reshape(codes, (BR, NB, 8, 2)))
        packed = even | (odd << 4)
        k8 = tl.arange(0, 8)
        poffs = r64[:, None, None] * (C // 2) + (scols * 8)[None, :, None] + k8[None, None, :]
        tl.store(packed_ptr + poffs, packed, mask=rmask[:, None, None] & (scols < C // 16)[None, :, None])
    else:
        packed = pack_codes(tl.reshape(codes, (BR, BC)), BR, BC)
        pcols = pid_c * (BC // 2) + tl.arange(0, BC // 2)
        tl.store(packed_ptr + r64[:, None] * (C // 2) + pcols[None, :], packed,
                 mask=rmask[:, None] & (pcols[None, :] < C // 2))
    if TILE16:
        tl.store(scales_ptr + (r64 // 16)[:, None] * (C // 16) + scols[None, :], e4m3_bits(s),
                 mask=(rmask & ((rows % 16) == 0))[:, None] & (scols[None, :] < C // 16))
    else:
        tl.store(scales_ptr + r64[:, None] * (C // 16) + scols[None, :], e4m3_bits(s),
                 mask=rmask[:, None] & (scols[None, :] < C // 16))


def tensor_amax(x: torch.Tensor, amax_mode: Optional[int] = None, zeroed: Optional[torch.Tensor] = None,
                tiles: Optional[int] = None, block: Optional[int] = None):
    """(amax as an int32 bit-pattern buffer [1], non-finite flag [1]) of a contiguous tensor.
    `zeroed`: a zero-filled int32 buffer of 2 to use (saves a memset launch) in atomics mode.
    `tiles` x `block` elements per program (defaults AMAX_TILES, AMAX_BLOCK)."""
    amax_mode = DEFAULTS["AMAX_MODE"] if amax_mode is None else amax_mode
    tiles = AMAX_TILES if tiles is None else int(tiles)
    block = AMAX_BLOCK if block is None else int(block)
    n = x.numel()
    nparts = triton.cdiv(n, block * tiles)
    if amax_mode:
        buf = torch.empty(nparts + 2, dtype=torch.int32, device=x.device)   # written in full: no memset
        parts, amax_bits, nonfinite = buf[:nparts], buf[nparts:nparts + 1], buf[nparts + 1:]
    else:
        buf = zeroed if zeroed is not None else torch.zeros(2, dtype=torch.int32, device=x.device)
        parts, amax_bits, nonfinite = buf, buf[0:1], buf[1:2]
    _amax_kernel[(nparts,)](x, n, amax_bits, nonfinite, parts, BLOCK_N=block, TILES=tiles,
                            PARTIALS=bool(amax_mode), num_warps=8, enable_fp_fusion=False)
    if amax_mode:
        _amax_reduce_kernel[(1,)](parts, nparts, amax_bits, nonfinite, BLOCK=1024, num_warps=4)
    return amax_bits, nonfinite


def quantize_nvfp4_rtn(
    x: torch.Tensor,
    *,
    v: float = 6.0,
    smax: float = 448.0,
    ties: str = fmt.TIES_EVEN,
    four_over_six: bool = False,
    amax_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    block_r: Optional[int] = None,
    block_c: Optional[int] = None,
    num_warps: Optional[int] = None,
    variant: Optional[dict] = None,
    mode: str = "rn",
    stream: Optional[RandomStream] = None,
    block_rows: int = 1,
    emit_operand: bool = False,
) -> NVFP4Tensor:
    """Kernel twin of quantizers.quantize_nvfp4(x, mode, v, smax, ties, four_over_six, stream,
    block_rows) for 1x16 blocks: RN (optionally 4/6) or SR elements (NVIDIA's backward; counters
    (row_offset + row, col_offset + column) of `stream`); and for 16x16 tiles (block_rows=16,
    NVIDIA's weights) in RN, optionally 4/6 (nvidia-46: one choice per tile on its 256 FP64 squared
    errors, added in the twin's order, so near-ties break the same way).
    emit_operand: also write the GEMM operand dequantize_unscaled() in BF16 (exact) into the result's
    `operand` (1x16 blocks), for a consumer that would otherwise run the dequant kernel next."""
    if mode not in ("rn", "sr"):
        raise ValueError(f"rounding mode must be 'rn' or 'sr', got {mode!r}")
    if mode == "sr" and stream is None:
        raise ValueError("stochastic rounding needs a RandomStream")
    if mode == "sr" and four_over_six:
        raise ValueError("4/6 cannot be combined with stochastic rounding (it biases the estimator)")
    if x.dim() != 2 or x.shape[1] % BLOCK:
        raise ValueError(f"need a 2-D operand with cols % 16 == 0, got {tuple(x.shape)}")
    if block_rows not in (1, BLOCK):
        raise ValueError(f"block_rows must be 1 or 16, got {block_rows}")
    if block_rows == BLOCK and (mode != "rn" or x.shape[0] % BLOCK):
        raise ValueError("the 16x16-tile kernel does RN (optionally 4/6) on rows divisible by 16, got "
                         f"mode={mode!r}, rows={x.shape[0]}")
    if ties not in (fmt.TIES_EVEN, fmt.TIES_AWAY):
        raise ValueError(f"rtn_ties must be 'even' or 'away', got {ties!r}")
    if x.stride(1) != 1:
        x = x.contiguous()
    rows, cols = x.shape
    if x.stride(0) != cols:
        x = x.contiguous()
    var = dict(DEFAULTS, LOAD3D=not four_over_six, FAST_RN=1 if four_over_six else 2, **(variant or {}))
    zeroed = torch.zeros(3, dtype=torch.int32, device=x.device)   # amax, non-finite flag, flushed count
    amax_bits, nonfinite = tensor_amax(x, var.pop("AMAX_MODE"), zeroed[:2])
    if amax_reduce is not None:
        amax_bits = amax_reduce(amax_bits.view(torch.float32)).reshape(1).view(torch.int32)
    packed = torch.empty(rows, cols // 2, dtype=torch.uint8, device=x.device)
    scales = torch.empty(rows // block_rows, cols // BLOCK, dtype=torch.uint8, device=x.device)
    g = torch.empty(1, dtype=torch.float32, device=x.device)
    flushed = zeroed[2:3]
    # left out: RTN_CONFIG, or TILE46_CONFIG for 16x16 tiles with 4/6. 32 x 128 made Triton 3.6 spill the
    # tile choice's FP64 sums to local memory (~1,400 spill instructions before the FP32 screen, 338 after;
    # 59 ms a [16384 x 4096] operand on the H100). 16 x 128: 2 spill instructions, in the FP64 redo only;
    # the screened path ~103 instructions an element (Triton 3.6's SASS for sm_90, compiled on CPU)
    config = TILE46_CONFIG if block_rows == BLOCK and four_over_six else RTN_CONFIG
    block_r, block_c, num_warps = (c if v is None else v for v, c in zip((block_r, block_c, num_warps), config))
    if block_rows == BLOCK:
        block_r = max(16, block_r - block_r % 16)   # whole tiles per program
        if emit_operand:
            raise ValueError("emit_operand is for 1x16 operands")
    operand = torch.empty(rows, cols, dtype=torch.bfloat16, device=x.device) if emit_operand else None
    block_c = min(block_c, triton.next_power_of_2(cols))
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
    key_args, key_meta = stream_args(stream, zeroed)
    _rtn_kernel[grid](x, x.stride(0), rows, cols, amax_bits, nonfinite, packed, scales, g, flushed,
                      operand if emit_operand else packed,
                      float(smax * v), float(v), fp32_reciprocal(v),
                      *key_args,
                      *(stream.kernel_offsets() if stream else RandomStream(0).kernel_offsets()), SR=(mode == "sr"), FOUR_SIX=four_over_six, TIES_AWAY=(ties == fmt.TIES_AWAY),
                      SCALAR_RECIP=False, BR=block_r, BC=block_c, num_warps=num_warps,
                      INTERP=INTERPRET, enable_fp_fusion=False, TILE16=block_rows == BLOCK, EMIT=emit_operand,
                      **key_meta, **var)
    return NVFP4Tensor(packed=packed, block_scales=scales.view(torch.float8_e4m3fn),
                       tensor_scale=g.reshape(()), block_rows=block_rows, flushed_blocks=flushed.reshape(()),
                       operand=operand)
