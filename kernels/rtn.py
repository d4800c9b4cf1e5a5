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

from ._common import (FP32_MIN_NORMAL, div_scalar, e2m1_value, e4m3_bits, fp32_reciprocal, pack_codes,
                      rn_e2m1_code, rn_e4m3, tensor_scale)

AMAX_BLOCK = 8192


@triton.jit
def _amax_kernel(x_ptr, n, amax_bits_ptr, nonfinite_ptr, BLOCK_N: tl.constexpr):
    # one tile per program (a grid-stride loop measured 1.0 TB/s on H100: too few loads in flight)
    offs = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    a = tl.abs(tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32))
    finite = a < float("inf")                          # false for +-Inf and NaN
    amax = tl.max(tl.where(finite, a, 0.0), 0)
    bad = tl.max((~finite).to(tl.int32), 0)
    tl.atomic_max(amax_bits_ptr, amax.to(tl.int32, bitcast=True))   # >= 0 floats order as ints
    tl.atomic_max(nonfinite_ptr, bad, mask=bad > 0)


@triton.jit
def _candidate(xb, bamax, g, valid, target, inv_target, TIES_AWAY: tl.constexpr,
               SCALAR_RECIP: tl.constexpr):
    """One scale candidate: (scale value, keep mask [BR, NB], codes [BR, NB, 16])."""
    s = rn_e4m3(tl.math.div_rn(div_scalar(bamax, target, inv_target, SCALAR_RECIP), g))
    divisor = s * g
    keep = (s > 0) & (divisor >= FP32_MIN_NORMAL) & ((tl.zeros_like(s) + valid) > 0.5)
    safe = tl.where(keep, divisor, 1.0)
    y = tl.math.div_rn(xb, safe[:, :, None])
    y = tl.where(keep[:, :, None], y, 0.0)
    codes = rn_e2m1_code(y, TIES_AWAY)
    s = tl.where(keep, s, 0.0)
    return s, keep, codes


@triton.jit
def _rtn_kernel(x_ptr, stride_r, R, C, amax_bits_ptr, nonfinite_ptr,
                packed_ptr, scales_ptr, gout_ptr, flushed_ptr,
                SMAX_V, V, INV_V,
                FOUR_SIX: tl.constexpr, TIES_AWAY: tl.constexpr, SCALAR_RECIP: tl.constexpr,
                BR: tl.constexpr, BC: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    NB: tl.constexpr = BC // 16
    g, valid = tensor_scale(amax_bits_ptr, nonfinite_ptr, gout_ptr, SMAX_V,
                             (pid_r == 0) & (pid_c == 0))
    rows = pid_r * BR + tl.arange(0, BR)
    cols = pid_c * BC + tl.arange(0, BC)
    rmask = rows < R
    mask = rmask[:, None] & (cols[None, :] < C)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_r + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    x = tl.where(tl.abs(x) < float("inf"), x, 0.0)           # non-finite -> 0 (g carries the NaN)
    xb = tl.reshape(x, (BR, NB, 16))
    bamax = tl.max(tl.abs(xb), axis=2)
    s, keep, codes = _candidate(xb, bamax, g, valid, V, INV_V, TIES_AWAY, SCALAR_RECIP)
    if FOUR_SIX:
        # "max->4" candidate; keep the lower SSE measured in units of g (x/g), ties to "max->6".
        # Exact ties are common (s4 == 1.5*s6 puts both candidates on shared grid points; ~1 block
        # in 2000 on bf16 data), so the SSE must be exact enough to see them: each error is exact
        # in FP32 (Sterbenz: x/g lies within half a step of its grid point), its square is exact in
        # FP64 and so, for all practical data, is the 16-term FP64 sum. The FP32 reference sums
        # rounded squares and breaks such ties by rounding noise (see docs/RESULTS_kernels.md).
        s4, keep4, codes4 = _candidate(xb, bamax, g, valid, 4.0, 0.25, TIES_AWAY, SCALAR_RECIP)
        xg = tl.math.div_rn(xb, g)
        e6 = (xg - e2m1_value(codes) * s[:, :, None]).to(tl.float64)
        e4 = (xg - e2m1_value(codes4) * s4[:, :, None]).to(tl.float64)
        use4 = tl.sum(e4 * e4, axis=2) < tl.sum(e6 * e6, axis=2)
        s = tl.where(use4, s4, s)
        codes = tl.where(use4[:, :, None], codes4, codes)
        keep = tl.where(use4, keep4, keep)
    flushed = tl.sum(tl.sum(((~keep) & (bamax > 0)).to(tl.int32), axis=1), axis=0)
    tl.atomic_add(flushed_ptr, flushed)
    packed = pack_codes(tl.reshape(codes, (BR, BC)), BR, BC)
    pcols = pid_c * (BC // 2) + tl.arange(0, BC // 2)
    tl.store(packed_ptr + rows[:, None].to(tl.int64) * (C // 2) + pcols[None, :], packed,
             mask=rmask[:, None] & (pcols[None, :] < C // 2))
    scols = pid_c * NB + tl.arange(0, NB)
    tl.store(scales_ptr + rows[:, None].to(tl.int64) * (C // 16) + scols[None, :], e4m3_bits(s),
             mask=rmask[:, None] & (scols[None, :] < C // 16))


def tensor_amax(x: torch.Tensor):
    """(amax as an int32 bit-pattern buffer [1], non-finite flag [1]) of a contiguous tensor."""
    amax_bits = torch.zeros(1, dtype=torch.int32, device=x.device)
    nonfinite = torch.zeros(1, dtype=torch.int32, device=x.device)
    n = x.numel()
    _amax_kernel[(triton.cdiv(n, AMAX_BLOCK),)](x, n, amax_bits, nonfinite, BLOCK_N=AMAX_BLOCK, num_warps=8,
                           enable_fp_fusion=False)
    return amax_bits, nonfinite


def quantize_nvfp4_rtn(
    x: torch.Tensor,
    *,
    v: float = 6.0,
    smax: float = 448.0,
    ties: str = fmt.TIES_EVEN,
    four_over_six: bool = False,
    amax_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    block_r: int = 32,
    block_c: int = 128,
    num_warps: int = 4,
) -> NVFP4Tensor:
    """Kernel twin of quantizers.quantize_nvfp4(x, mode="rn", v, smax, ties, four_over_six)."""
    if x.dim() != 2 or x.shape[1] % BLOCK:
        raise ValueError(f"need a 2-D operand with cols % 16 == 0, got {tuple(x.shape)}")
    if ties not in (fmt.TIES_EVEN, fmt.TIES_AWAY):
        raise ValueError(f"rtn_ties must be 'even' or 'away', got {ties!r}")
    if x.stride(1) != 1:
        x = x.contiguous()
    rows, cols = x.shape
    if x.stride(0) != cols:
        x = x.contiguous()
    amax_bits, nonfinite = tensor_amax(x)
    if amax_reduce is not None:
        amax_bits = amax_reduce(amax_bits.view(torch.float32)).reshape(1).view(torch.int32)
    packed = torch.empty(rows, cols // 2, dtype=torch.uint8, device=x.device)
    scales = torch.empty(rows, cols // BLOCK, dtype=torch.uint8, device=x.device)
    g = torch.empty(1, dtype=torch.float32, device=x.device)
    flushed = torch.zeros(1, dtype=torch.int32, device=x.device)
    block_c = min(block_c, triton.next_power_of_2(cols))
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
    _rtn_kernel[grid](x, x.stride(0), rows, cols, amax_bits, nonfinite, packed, scales, g, flushed,
                      float(smax * v), float(v), fp32_reciprocal(v),
                      FOUR_SIX=four_over_six, TIES_AWAY=(ties == fmt.TIES_AWAY),
                      SCALAR_RECIP=x.is_cuda, BR=block_r, BC=block_c, num_warps=num_warps,
                      enable_fp_fusion=False)
    return NVFP4Tensor(packed=packed, block_scales=scales.view(torch.float8_e4m3fn),
                       tensor_scale=g.reshape(()), block_rows=1, flushed_blocks=flushed.reshape(()))
