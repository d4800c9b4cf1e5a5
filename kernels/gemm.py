"""Block-scaled GEMM on packed NVFP4 operands, dequantized in registers: the twin of
`megatron_fp4.gemm.matmul` (and of dispatch.matmul's dequant + cuBLAS path).

C [M, N] = A @ B^T for A [M, K], B [N, K], both quantized along K (the GEMM's inner dimension), read
as packed E2M1 codes (half a byte per element) and E4M3 block scales (one byte per 16). Each K-step
unpacks a tile of each operand, multiplies codes by their block scales (e2m1 * e4m3 is exact in BF16,
numerics.md §1.4) and feeds the BF16 tiles to the tensor cores with FP32 accumulation, so the
operands are the same exact values cuBLAS gets from the dequant kernel; only the FP32 summation order
differs between the two (both are valid emulations of the block-scaled MMA). Why: the dequant path
writes and re-reads a BF16 copy of both operands and an FP32 output before the epilogue; here the
operands are read at 4.5 bits per element and the epilogue writes the output dtype directly.

Operand forms (constexpr):
- per-tensor scaled (Quartet II, NVIDIA): one FP32 accumulator over all of K; epilogue
  ((acc * (g_a * g_b)) * g_extra) -> out dtype, the same FP32 ops in the same order as
  dequant.scale_cast;
- double block (TetraJet-v2, 1x128 FP32 outer scales): one 128-wide K-step per slab,
  acc = acc + dot(slab) * (s_out_a[m] * s_out_b[n]), exactly gemm.matmul's "exact" mode (per-slab
  FP32 partial, scaled, summed in slab order; enable_fp_fusion=False keeps the multiply and the add
  separate roundings);
- 16x16 scale tiles (NVIDIA weights): the scale row is row // 16.

The interpreter reads BF16 dot operands as integers (see _common.dot_pm1), so under it the tiles are
FP32 (every product is still exact).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from megatron_fp4 import format as fmt
from megatron_fp4.tensor import BLOCK, OUTER_BLOCK, NVFP4Tensor

from ._common import INTERPRET, block_values, unpack_codes
from .dequant import _round_bf16

# Tile shape per launch: (BM, BN, BK, GROUP_M, num_warps, num_stages). One default, others for the
# benchmark's sweep; the GPU decides (benchmarks/bench_kernels.py measures this kernel against the
# dequant + cuBLAS path per shape). BK is 128 for double-block operands (one outer-scale slab).
CONFIGS = {
    "128x128x128w8": (128, 128, 128, 8, 8, 3),
    "128x256x64w8": (128, 256, 64, 8, 8, 3),
    "128x128x64w4": (128, 128, 64, 8, 4, 4),
    "64x128x128w4": (64, 128, 128, 8, 4, 3),
}
DEFAULT_CONFIG = "128x128x128w8"


@triton.jit
def _operand_tile(packed_ptr, scales_ptr, rows, R, K, k0, BLOCK_ROWS: tl.constexpr, BR: tl.constexpr,
                  BK: tl.constexpr, INTERP: tl.constexpr):
    """[BR, BK] tile of e2m1(q) * e4m3(s) for operand rows `rows`, columns k0..k0+BK (zero outside)."""
    r64 = rows.to(tl.int64)[:, None]
    rmask = (rows < R)[:, None]
    bcols = k0 // 2 + tl.arange(0, BK // 2)
    scols = k0 // 16 + tl.arange(0, BK // 16)
    srow = (rows // BLOCK_ROWS).to(tl.int64)[:, None]
    byte = tl.load(packed_ptr + r64 * (K // 2) + bcols[None, :], mask=rmask & (bcols < K // 2)[None, :], other=0)
    sb = tl.load(scales_ptr + srow * (K // 16) + scols[None, :], mask=rmask & (scols < K // 16)[None, :], other=0)
    vals = block_values(unpack_codes(byte, BR, BK), sb, BR, BK)
    if INTERP:
        return vals
    else:
        return vals.to(tl.bfloat16)


@triton.jit
def _nvfp4_gemm_kernel(a_packed, a_scales, a_outer, b_packed, b_scales, b_outer, c_ptr,
                       ga_ptr, gb_ptr, gx_ptr, M, N, K,
                       DOUBLE_BLOCK: tl.constexpr, A_BLOCK_ROWS: tl.constexpr, B_BLOCK_ROWS: tl.constexpr,
                       HAS_EXTRA: tl.constexpr, OUT_BF16: tl.constexpr, INTERP: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped program order: GROUP_M row-tiles share each column-tile of B while it is in L2
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(N, BN)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % per_group) % group_rows
    tile_n = (pid % per_group) // group_rows
    rows_a = tile_m * BM + tl.arange(0, BM)
    rows_b = tile_n * BN + tl.arange(0, BN)

    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        a = _operand_tile(a_packed, a_scales, rows_a, M, K, k0, A_BLOCK_ROWS, BM, BK, INTERP)
        b = _operand_tile(b_packed, b_scales, rows_b, N, K, k0, B_BLOCK_ROWS, BN, BK, INTERP)
        if DOUBLE_BLOCK:
            slab = k0 // 128
            oa = tl.load(a_outer + rows_a.to(tl.int64) * (K // 128) + slab, mask=rows_a < M, other=0.0)
            ob = tl.load(b_outer + rows_b.to(tl.int64) * (K // 128) + slab, mask=rows_b < N, other=0.0)
            part = tl.dot(a, tl.trans(b))
            acc = acc + part * (oa[:, None] * ob[None, :])
        else:
            acc = tl.dot(a, tl.trans(b), acc)

    if not DOUBLE_BLOCK:
        acc = acc * (tl.load(ga_ptr) * tl.load(gb_ptr))
    if HAS_EXTRA:
        acc = acc * tl.load(gx_ptr)
    c_off = rows_a.to(tl.int64)[:, None] * N + rows_b[None, :]
    c_mask = (rows_a < M)[:, None] & (rows_b < N)[None, :]
    if OUT_BF16:
        tl.store(c_ptr + c_off, _round_bf16(acc, INTERP), mask=c_mask)
    else:
        tl.store(c_ptr + c_off, acc, mask=c_mask)


def _check_operands(a: NVFP4Tensor, b: NVFP4Tensor) -> bool:
    """Validates the pair; returns True for double-block operands."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"inner dims differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    double_block = a.outer_scales is not None
    if double_block != (b.outer_scales is not None):
        raise ValueError("cannot multiply a double-block operand with a per-tensor-scaled one")
    k = a.shape[1]
    if k % BLOCK:
        raise ValueError(f"the inner dim ({k}) must be a multiple of {BLOCK}")
    for name, t in (("a", a), ("b", b)):
        if t.block_rows not in (1, 16):
            raise ValueError(f"operand {name}: block_rows must be 1 or 16, got {t.block_rows}")
        if t.block_rows == 16 and t.shape[0] % 16:
            raise ValueError(f"operand {name}: 16x16 tiles need rows ({t.shape[0]}) divisible by 16")
        if double_block:
            if t.tensor_scale is not None or t.block_rows != 1:
                raise ValueError(f"operand {name}: double-block operands carry 1x16 blocks and no tensor scale")
        elif t.tensor_scale is None:
            raise ValueError(f"operand {name}: a per-tensor-scaled operand needs its tensor scale")
    if double_block and k % OUTER_BLOCK:
        raise ValueError(f"double-block operands need the inner dim ({k}) to be a multiple of {OUTER_BLOCK}")
    return double_block


def nvfp4_matmul(a: NVFP4Tensor, b: NVFP4Tensor, *, scale: Optional[torch.Tensor] = None,
                 out_dtype: torch.dtype = torch.float32, config: str = DEFAULT_CONFIG) -> torch.Tensor:
    """[M, N] = (gemm.matmul(a, b, "exact") * scale).to(out_dtype), from packed operands in one launch.

    Per-tensor-scaled operands: equal to the reference up to FP32 summation order (the products are
    exact, so the result is exact whenever the sums are). Double-block operands: the "exact" mode,
    per-slab partials scaled by the outer scales and summed in slab order.
    """
    double_block = _check_operands(a, b)
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"out_dtype must be float32 or bfloat16, got {out_dtype}")
    if config not in CONFIGS:
        raise ValueError(f"unknown GEMM config {config!r}; known: {sorted(CONFIGS)}")
    m, k = a.shape
    n = b.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    if k == 0:   # an empty sum: zeros, scaled as the reference scales its (empty) GEMM output
        g = torch.zeros(m, n, device=a.device) if double_block else torch.zeros(m, n, device=a.device) * (
            a.tensor_scale * b.tensor_scale)
        return (g if scale is None else g * scale).to(out_dtype)
    bm, bn, bk, group_m, warps, stages = CONFIGS[config]
    if double_block:
        bk = OUTER_BLOCK
    if INTERPRET:   # the interpreter's cost grows with the tile; the numerics do not depend on it
        bm, bn = min(bm, 64), min(bn, 64)
    one = fmt.device_constant(1.0, device=a.device)   # stands in for absent scales (cached: no launch)
    ga = a.tensor_scale if a.tensor_scale is not None else one
    gb = b.tensor_scale if b.tensor_scale is not None else one
    gx = scale if scale is not None else one
    outer_a = a.outer_scales.float().contiguous() if double_block else a.packed
    outer_b = b.outer_scales.float().contiguous() if double_block else b.packed
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _nvfp4_gemm_kernel[grid](
        a.packed.contiguous(), a.block_scales.view(torch.uint8).contiguous(), outer_a,
        b.packed.contiguous(), b.block_scales.view(torch.uint8).contiguous(), outer_b, out,
        ga.float().reshape(1), gb.float().reshape(1), gx.float().reshape(1), m, n, k,
        DOUBLE_BLOCK=double_block, A_BLOCK_ROWS=a.block_rows, B_BLOCK_ROWS=b.block_rows,
        HAS_EXTRA=scale is not None, OUT_BF16=out_dtype == torch.bfloat16, INTERP=INTERPRET,
        BM=bm, BN=bn, BK=bk, GROUP_M=group_m, num_warps=warps, num_stages=stages, enable_fp_fusion=False)
    return out
