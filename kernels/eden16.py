"""RHT-128 + MS-EDEN with the per-16 correction (numerics.md §5.3, `eden_group: 16`, the recipe
`quartet2-kernel`): the twin of `quantizers.quantize_ms_eden(hadamard.rht(A, sigma), stream=...,
eden_group=16)`.

Two launches, one read of the source (the per-16 variant needs no amax before its codes):
1. `_eden16_codes_kernel`: rotate (the per-128 kernel's `_load_rotate`: dense, transposed or from
   packed), per 16-block m = amax / v truncated to 4 mantissa bits, u = z / m, codes RN4(u) (packed),
   the block's correction S = sum u^2 / sum u q (halving-tree sums, the twin's order), r = bf16(m S)
   stored as FP32 [R, C/16]; the max of r, the non-finite flag and the flushed-block count.
2. `_eden16_scales_kernel`: g = max r / 256 and per block the E4M3 scale SR8(r / g) (RN8 below 2^-6 or
   above 448, as the twin), one uniform per 16-block with the per-128 kernel's counters; the clamped
   count (r / g > 448). Reads and writes only per-block bytes.
An optional TP all-reduce of max r runs between the two.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from megatron_fp4 import format as fmt
from megatron_fp4.quantizers import EDEN_V
from megatron_fp4.rng import RandomStream
from megatron_fp4.tensor import BLOCK, NVFP4Tensor

from ._common import (FP32_MIN_NORMAL, INTERPRET, div_prep, div_scalar, e4m3_bits, exact_div, hash_uniform,
                      counter, pack_codes, rn_e2m1, rn_e4m3, signed_hadamard, sr_e4m3, stream_args, stream_key,
                      tensor_scale)
from .eden import INV_SQRT_128, N_RHT, _load_h, _load_rotate, _source
from .rtn import _halving_sum_16


@triton.jit
def _bf16_rne(x):
    """FP32 -> the nearest BF16 value (ties to even) as FP32, for finite x, by integer rounding of the
    bit pattern: the same on the GPU and under the interpreter (whose float-to-bf16 cast truncates)."""
    b = x.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _eden16_codes_kernel(src_ptr, ssc_ptr, stride_s, R, C, h_ptr, INV_SQRT, rmax_bits_ptr, nonfinite_ptr,
                         flushed_ptr, packed_ptr, r_ptr, V, INV_V,
                         SRC: tl.constexpr, SPLIT: tl.constexpr, INTERP: tl.constexpr, BR: tl.constexpr,
                         TILES: tl.constexpr, TIES_AWAY: tl.constexpr):
    c0 = tl.program_id(1) * 128
    h = _load_h(h_ptr)
    rmax = 0.0
    bad = 0
    flushed = 0
    for t in range(TILES):                   # TILES row tiles per program share one load of h
        r0 = (tl.program_id(0) * TILES + t) * BR
        z = _load_rotate(src_ptr, ssc_ptr, stride_s, R, r0, c0, h, INV_SQRT, SRC, SPLIT, INTERP, BR)
        finite = tl.abs(z) < float("inf")
        bad = tl.maximum(bad, tl.max(tl.max((~finite).to(tl.int32), axis=1), axis=0))
        zb = tl.reshape(tl.where(finite, z, 0.0), (BR, 8, 16))      # non-finite -> 0 (g carries NaN)
        bamax = tl.max(tl.abs(zb), axis=2)                             # [BR, 8]
        # m = amax / v (IEEE), truncated toward zero to 4 explicit mantissa bits
        m = (div_scalar(bamax, V, INV_V, False).to(tl.uint32, bitcast=True) & 0xFFF80000).to(
            tl.float32, bitcast=True)
        keep = m >= FP32_MIN_NORMAL
        dn, p, rc = div_prep(tl.where(keep, m, 1.0))
        u = tl.where(keep[:, :, None], exact_div(zb, dn[:, :, None], p[:, :, None], rc[:, :, None], INTERP), 0.0)
        codes, q = rn_e2m1(u, TIES_AWAY, False)
        num = _halving_sum_16(u * u, BR, 8)
        den = _halving_sum_16(u * q, BR, 8)
        ok = den >= FP32_MIN_NORMAL
        factor = tl.where(ok, tl.math.div_rn(num, tl.where(ok, den, 1.0)), 1.0)
        r = tl.where(keep, _bf16_rne(m * factor), 0.0)
        rows = r0 + tl.arange(0, BR)
        rmask = rows < R
        rmax = tl.maximum(rmax, tl.max(tl.max(tl.where(rmask[:, None], r, 0.0), axis=1), axis=0))
        flushed += tl.sum(tl.sum(((~keep) & (bamax > 0)).to(tl.int32), axis=1), axis=0)
        packed = pack_codes(tl.reshape(codes, (BR, 128)), BR, 128)
        pcols = c0 // 2 + tl.arange(0, 64)
        tl.store(packed_ptr + rows[:, None].to(tl.int64) * (C // 2) + pcols[None, :], packed, mask=rmask[:, None])
        scols = c0 // 16 + tl.arange(0, 8)
        tl.store(r_ptr + rows[:, None].to(tl.int64) * (C // 16) + scols[None, :], r, mask=rmask[:, None])
    tl.atomic_max(rmax_bits_ptr, rmax.to(tl.int32, bitcast=True))     # r >= 0: ordered as integers
    tl.atomic_max(nonfinite_ptr, bad, mask=bad > 0)
    tl.atomic_add(flushed_ptr, flushed, mask=flushed > 0)


@triton.jit(do_not_specialize=["role"])
def _eden16_scales_kernel(r_ptr, R, NBLK, rmax_bits_ptr, nonfinite_ptr, gout_ptr, scales_ptr, clamped_ptr,
                          key, state_ptr, role, row_off, row_split, row_hi, col_off, col_split, col_hi,
                          BR: tl.constexpr, NB: tl.constexpr, NSTATE: tl.constexpr = 0, NROLE: tl.constexpr = 0):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    # g = max_b r_b / 256 (numerics.md §5.3 step 3)
    g, valid = tensor_scale(rmax_bits_ptr, nonfinite_ptr, gout_ptr, 256.0, (pid_r == 0) & (pid_c == 0))
    rows = pid_r * BR + tl.arange(0, BR)
    bcols = pid_c * NB + tl.arange(0, NB)
    mask = (rows < R)[:, None] & (bcols < NBLK)[None, :]
    offs = rows[:, None].to(tl.int64) * NBLK + bcols[None, :]
    r = tl.load(r_ptr + offs, mask=mask, other=0.0)
    t = tl.math.div_rn(r, g)
    k = stream_key(key, state_ptr, role, NSTATE, NROLE)
    uni = hash_uniform(k, counter(rows, row_off, row_split, row_hi)[:, None],
                       counter(bcols * 16, col_off, col_split, col_hi)[None, :])
    use_rn = (t < 2.0 ** -6) | (t > 448.0)          # the kernel's deterministic RN8 outside SR8's range
    bits = tl.where(use_rn, e4m3_bits(rn_e4m3(t)), sr_e4m3(t, uni))
    bits = tl.where((tl.zeros_like(t) + valid) > 0.5, bits, 0)
    tl.store(scales_ptr + offs, bits, mask=mask)
    clamped = tl.sum(tl.sum((mask & (t > 448.0)).to(tl.int32), axis=1), axis=0)
    tl.atomic_add(clamped_ptr, clamped, mask=clamped > 0)


def rht_ms_eden16(
    a: Optional[torch.Tensor] = None,
    sigma: Optional[torch.Tensor] = None,
    stream: Optional[RandomStream] = None,
    *,
    transpose: bool = False,
    packed: Optional[NVFP4Tensor] = None,
    v: float = EDEN_V,
    ties: str = fmt.TIES_EVEN,
    amax_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    block_r: int = 64,
    tiles: int = 4,
    num_warps: int = 4,
) -> NVFP4Tensor:
    """Per-16 MS-EDEN of A after RHT-128 with signs sigma, A along its last dim, where A is `a`, `a.t()`
    (transpose=True) or `packed.dequantize_unscaled().t()` (packed=...).

    Twin: quantizers.quantize_ms_eden(hadamard.rht(A, sigma), stream=stream, eden_group=16, v, ties,
    amax_reduce) (amax_reduce acts on max r). Scale-SR counters: (row_offset + row, col_offset + column
    of the block), as the per-128 kernel."""
    if stream is None:
        raise ValueError("MS-EDEN needs a RandomStream for the scale SR")
    if ties not in (fmt.TIES_EVEN, fmt.TIES_AWAY):
        raise ValueError(f"rtn_ties must be 'even' or 'away', got {ties!r}")
    src, sc, stride, rows, cols, mode, split = _source(a, packed, transpose)
    if cols % N_RHT:
        raise ValueError(f"the rotated dim ({cols}) must be a multiple of 128")
    dev = src.device
    h = signed_hadamard(sigma, dev, N_RHT)
    words = torch.zeros(4, dtype=torch.int32, device=dev)   # max r, non-finite flag, flushed, clamped
    rmax_bits, nonfinite, flushed, clamped = words[0:1], words[1:2], words[2:3], words[3:4]
    packed_out = torch.empty(rows, cols // 2, dtype=torch.uint8, device=dev)
    r = torch.empty(rows, cols // BLOCK, dtype=torch.float32, device=dev)
    grid = (triton.cdiv(rows, block_r * tiles), cols // N_RHT)
    _eden16_codes_kernel[grid](src, sc, stride, rows, cols, h, INV_SQRT_128, rmax_bits, nonfinite, flushed,
                               packed_out, r, float(v), 1.0 / float(v), SRC=mode, SPLIT=split, INTERP=INTERPRET,
                               BR=block_r, TILES=tiles, TIES_AWAY=(ties == fmt.TIES_AWAY), num_warps=num_warps,
                               enable_fp_fusion=False)
    if amax_reduce is not None:
        rmax_bits = amax_reduce(rmax_bits.view(torch.float32)).reshape(1).view(torch.int32)
    scales = torch.empty(rows, cols // BLOCK, dtype=torch.uint8, device=dev)
    g = torch.empty(1, dtype=torch.float32, device=dev)
    key_args, key_meta = stream_args(stream, words)
    nblk = cols // BLOCK
    sgrid = (triton.cdiv(rows, 64), triton.cdiv(nblk, 64))
    _eden16_scales_kernel[sgrid](r, rows, nblk, rmax_bits, nonfinite, g, scales, clamped, *key_args,
                                 *stream.kernel_offsets(), BR=64, NB=64, num_warps=4, enable_fp_fusion=False,
                                 **key_meta)
    return NVFP4Tensor(packed=packed_out, block_scales=scales.view(torch.float8_e4m3fn), tensor_scale=g.reshape(()),
                       flushed_blocks=flushed.reshape(()), clamped_scales=clamped.reshape(()))
