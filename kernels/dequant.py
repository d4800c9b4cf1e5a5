"""Packed NVFP4 (1x16) -> BF16 e2m1(q)*e4m3(s), one pass: the twin of
`NVFP4Tensor.dequantize_unscaled()`. Every such product is exact in BF16 (numerics.md §1.4), so the
GEMM operand is exact and cuBLAS BF16 x BF16 -> FP32 reproduces the block-scaled MMA (gemm.py).
Also: double-block operands (TetraJet-v2) -> FP32 or BF16 `dequantize()` values, the GEMM's
FP32 -> output epilogue, and the packed transpose of 16x16-tile operands (NVIDIA's dgrad W^T)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_fp4.tensor import BLOCK, OUTER_BLOCK, NVFP4Tensor

from ._common import block_values, pack_codes, unpack_codes


@triton.jit
def _dequant_kernel(packed_ptr, scales_ptr, out_ptr, R, C, BLOCK_ROWS: tl.constexpr, BR: tl.constexpr,
                    BC: tl.constexpr):
    # BLOCK_ROWS: 1 for 1x16 blocks, 16 for 16x16 tiles (one scale row per 16 rows)
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    bcols = tl.program_id(1) * (BC // 2) + tl.arange(0, BC // 2)
    scols = tl.program_id(1) * (BC // 16) + tl.arange(0, BC // 16)
    rmask = (rows < R)[:, None]
    r64 = rows[:, None].to(tl.int64)
    byte = tl.load(packed_ptr + r64 * (C // 2) + bcols[None, :], mask=rmask & (bcols < C // 2)[None, :], other=0)
    srow = (rows // BLOCK_ROWS)[:, None].to(tl.int64)
    sb = tl.load(scales_ptr + srow * (C // 16) + scols[None, :], mask=rmask & (scols < C // 16)[None, :], other=0)
    vals = block_values(unpack_codes(byte, BR, BC), sb, BR, BC)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    tl.store(out_ptr + r64 * C + cols[None, :], vals.to(tl.bfloat16),
             mask=rmask & (cols < C)[None, :])


def dequantize_unscaled_bf16(t: NVFP4Tensor, block_r: int = 32, block_c: int = 256) -> torch.Tensor:
    """BF16 [rows, cols] = e2m1(q) * e4m3(s) for a 1x16 or 16x16-tile operand (exact)."""
    if t.block_rows not in (1, 16) or t.shape[0] % t.block_rows:
        raise ValueError(f"the dequant kernel handles 1x16 blocks and 16x16 tiles (rows divisible by 16), "
                         f"got block_rows={t.block_rows} with {t.shape[0]} rows")
    rows, cols = t.shape
    out = torch.empty(rows, cols, dtype=torch.bfloat16, device=t.device)
    block_c = min(block_c, triton.next_power_of_2(cols))
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
    _dequant_kernel[grid](t.packed.contiguous(), t.block_scales.view(torch.uint8).contiguous(), out,
                          rows, cols, BLOCK_ROWS=t.block_rows, BR=block_r, BC=block_c, num_warps=4)
    return out


@triton.jit
def _round_bf16(y, INTERP: tl.constexpr):
    """FP32 -> BF16 round to nearest even. The interpreter's cast truncates, so there the rounding is
    done on the bits (finite values; NaN keeps a quiet-NaN pattern)."""
    if INTERP:
        b = y.to(tl.uint32, bitcast=True)
        rb = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
        rb = tl.where(y == y, rb, 0x7FC00000)
        y = rb.to(tl.float32, bitcast=True)
    return y.to(tl.bfloat16)


@triton.jit
def _dequant_double_block_kernel(packed_ptr, scales_ptr, outer_ptr, out_ptr, R, C, OUT_BF16: tl.constexpr,
                                 INTERP: tl.constexpr, BR: tl.constexpr):
    # one 128-column slab per program column: (e2m1(q) * e4m3(s_in)) * s_out in FP32, the reference's
    # order (NVFP4Tensor.dequantize), then optionally RNE to BF16 as gemm.matmul's "bf16" mode does
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    slab = tl.program_id(1)
    rmask = (rows < R)[:, None]
    r64 = rows[:, None].to(tl.int64)
    bcols = slab * 64 + tl.arange(0, 64)
    scols = slab * 8 + tl.arange(0, 8)
    byte = tl.load(packed_ptr + r64 * (C // 2) + bcols[None, :], mask=rmask, other=0)
    sb = tl.load(scales_ptr + r64 * (C // 16) + scols[None, :], mask=rmask, other=0)
    so = tl.load(outer_ptr + r64 * (C // 128) + slab, mask=rmask, other=0.0)       # [BR, 1]
    vals = block_values(unpack_codes(byte, BR, 128), sb, BR, 128)
    vals = vals * so
    cols = slab * 128 + tl.arange(0, 128)
    if OUT_BF16:
        tl.store(out_ptr + r64 * C + cols[None, :], _round_bf16(vals, INTERP), mask=rmask)
    else:
        tl.store(out_ptr + r64 * C + cols[None, :], vals, mask=rmask)


def dequantize_double_block(t: NVFP4Tensor, out_dtype=torch.float32, block_r: int = 32) -> torch.Tensor:
    """Twin of `t.dequantize()` (FP32, bit for bit) for a double-block operand, or of
    `t.dequantize().to(torch.bfloat16)` with out_dtype=bfloat16: one pass instead of the reference's
    unpack / decode / two scale expansions / two multiplies (and cast)."""
    from ._common import INTERPRET
    if t.outer_scales is None or t.block_rows != 1 or t.tensor_scale is not None:
        raise ValueError("the double-block dequant kernel needs a 1x16 operand with 1x128 outer scales")
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"out_dtype must be float32 or bfloat16, got {out_dtype}")
    rows, cols = t.shape
    if cols % OUTER_BLOCK:
        raise ValueError(f"columns ({cols}) must be a multiple of {OUTER_BLOCK}")
    out = torch.empty(rows, cols, dtype=out_dtype, device=t.device)
    grid = (triton.cdiv(rows, block_r), cols // OUTER_BLOCK)
    _dequant_double_block_kernel[grid](t.packed.contiguous(), t.block_scales.view(torch.uint8).contiguous(),
                                       t.outer_scales.float().contiguous(), out, rows, cols,
                                       OUT_BF16=out_dtype == torch.bfloat16, INTERP=INTERPRET, BR=block_r,
                                       num_warps=4, enable_fp_fusion=False)
    return out


@triton.jit
def _scale_cast_kernel(p_ptr, out_ptr, n, ga_ptr, gb_ptr, gx_ptr, HAS_EXTRA: tl.constexpr,
                       OUT_BF16: tl.constexpr, INTERP: tl.constexpr, BLOCK: tl.constexpr):
    # GEMM epilogue in one pass: ((P * (g_a*g_b)) * g_extra) -> output dtype, the same FP32 ops in the
    # same order as the reference (out.mul_(ga*gb), then * extra, then .to(dtype)), so the same bits
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(ga_ptr) * tl.load(gb_ptr)
    y = tl.load(p_ptr + offs, mask=mask, other=0.0) * g
    if HAS_EXTRA:
        y = y * tl.load(gx_ptr)
    if OUT_BF16:
        tl.store(out_ptr + offs, _round_bf16(y, INTERP), mask=mask)
    else:
        tl.store(out_ptr + offs, y, mask=mask)


def scale_cast(p: torch.Tensor, ga: torch.Tensor, gb: torch.Tensor, extra=None,
               out_dtype=torch.float32) -> torch.Tensor:
    """((p * (ga*gb)) * extra).to(out_dtype) in one pass over the FP32 GEMM output p (contiguous).
    For FP32 output the result overwrites p (no new buffer)."""
    from ._common import INTERPRET
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"out_dtype must be float32 or bfloat16, got {out_dtype}")
    out = p if out_dtype == torch.float32 else torch.empty(p.shape, dtype=out_dtype, device=p.device)
    n = p.numel()
    block = 4096
    _scale_cast_kernel[(triton.cdiv(n, block),)](p, out, n, ga.reshape(1), gb.reshape(1),
                                                (extra if extra is not None else ga).reshape(1),
                                                HAS_EXTRA=extra is not None, OUT_BF16=out_dtype == torch.bfloat16,
                                                INTERP=INTERPRET, BLOCK=block, num_warps=8,
                                                enable_fp_fusion=False)
    return out


@triton.jit
def _transpose_codes_kernel(src_ptr, dst_ptr, R, C, BR: tl.constexpr, BC: tl.constexpr):
    # src: packed [R, C/2] codes; dst: packed [C, R/2] codes of the transpose (low nibble = even element)
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    bcols = tl.program_id(1) * (BC // 2) + tl.arange(0, BC // 2)
    byte = tl.load(src_ptr + rows.to(tl.int64)[:, None] * (C // 2) + bcols[None, :],
                   mask=(rows < R)[:, None] & (bcols < C // 2)[None, :], other=0)
    codes = unpack_codes(byte, BR, BC)                                      # [BR, BC], source order
    packed_t = pack_codes(tl.trans(codes), BC, BR)                          # [BC, BR/2]
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    tcols = tl.program_id(0) * (BR // 2) + tl.arange(0, BR // 2)
    tl.store(dst_ptr + cols.to(tl.int64)[:, None] * (R // 2) + tcols[None, :], packed_t,
             mask=(cols < C)[:, None] & (tcols < R // 2)[None, :])


def transpose_tiles(t: NVFP4Tensor, block: int = 64) -> NVFP4Tensor:
    """Twin of recipe.transpose_tiles: a 16x16-tile operand transposed (same values), the packed codes
    transposed in one pass instead of unpack / transpose / copy / pack; tile scales transposed."""
    if t.block_rows != BLOCK:
        raise ValueError("only 16x16-tile operands can be transposed without re-quantization")
    rows, cols = t.shape
    out = torch.empty(cols, rows // 2, dtype=torch.uint8, device=t.device)
    grid = (triton.cdiv(rows, block), triton.cdiv(cols, block))
    _transpose_codes_kernel[grid](t.packed.contiguous(), out, rows, cols, BR=block, BC=block, num_warps=4)
    return NVFP4Tensor(packed=out, block_scales=t.block_scales.t().contiguous(), tensor_scale=t.tensor_scale,
                       block_rows=BLOCK)
