"""One launch per observed operand for the quantization statistics (issue #19; megatron_fp4/stats.py).

On a statistics iteration every quantizer call leaves one row of FP32 words (stats.Layout) in its
group's arena. This kernel writes that whole row; `stats.write_twin` is its torch twin (the tests
compare them word for word). Before, each operand cost 8-13 small torch operations on the host
(the amax, the saturated count, the sampled rows of the source, codes, scales and outer scales),
about 0.6 ms of a slow host per operand, ~290 ms per statistics iteration of the ~1B model.

Programs: the first NP_AMAX reduce the source's amax (and, program by program, the saturated-scale
count) over grid-strided chunks, one atomic per program; the next N_ROWS * N_CHUNKS copy the sampled
rows, ROW_CHUNK operand columns each:
- source rows A[r_j, c] for c < C_SRC (zeros up to C): a dense A (any strides, BF16/FP16/FP32), or the
  represented values of a packed forward operand transposed (requant: A[r, c] = value of q at (c, r),
  q*s [*outer] [*g] as `NVFP4Tensor.column_values` forms them);
- the operand's packed row r_j, as the int32 words of its bytes;
- its E4M3 scale bytes of row r_j // block_rows, one per word (0..255);
- its FP32 outer scales of row r_j (double blocks).
Word 0 (the amax) holds the FP32 bits of max |A| as an int32 maximum (non-negative FP32 bits order as
integers; NaN's bits exceed +Inf's, so a NaN wins as in torch's amax); word 1 counts the scale bytes
b with b & 0x7F == 0x7E (448). The arena row must start zeroed in words 0 and 1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import e2m1_value, e4m3_value

AMAX_BLOCK = 4096
ROW_CHUNK = 1024
MAX_AMAX_PROGRAMS = 512


@triton.jit
def _scale_value(bits):
    """FP32 of E4M3 scale bytes (0x7F / 0xFF: NaN, as torch's float8_e4m3fn decodes them)."""
    b = bits.to(tl.uint32) & 0x7F
    return tl.where(b == 0x7F, float("nan"), e4m3_value(b))


@triton.jit
def _observe_kernel(src_ptr, s_r, s_c, numel, qsrc_ptr, qsrc_scales_ptr, qsrc_outer_ptr, qsrc_g_ptr, qsrc_c,
                    qsrc_block_rows, packed_ptr, scales_ptr, n_scales, outer_ptr, rows_ptr, c_src, C,
                    block_rows, arena_ptr, row_base, off_src, off_q, off_s, off_o, NP_AMAX, N_CHUNKS,
                    PACKED_SRC: tl.constexpr, SCALED: tl.constexpr, HAS_G: tl.constexpr,
                    SRC_OUTER: tl.constexpr, OUTER: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    row_ptr = arena_ptr + row_base.to(tl.int64)
    row_i32 = row_ptr.to(tl.pointer_type(tl.int32))
    if pid < NP_AMAX:
        offs = tl.arange(0, BLOCK)
        best = tl.zeros([BLOCK], dtype=tl.int32)
        # the source's amax over chunks pid, pid + NP_AMAX, ...
        if PACKED_SRC:
            # numel = packed bytes of the forward operand q [rows, qsrc_c / 2]
            for start in range(pid * BLOCK, numel, NP_AMAX * BLOCK):
                i = start + offs
                m = i < numel
                byte = tl.load(qsrc_ptr + i, mask=m, other=0).to(tl.int32)
                mag = tl.maximum(byte & 7, (byte >> 4) & 7)
                r = i // (qsrc_c // 2)
                col = (i % (qsrc_c // 2)) * 2
                sb = tl.load(qsrc_scales_ptr + (r // qsrc_block_rows) * (qsrc_c // 16) + col // 16, mask=m, other=0)
                v = e2m1_value(mag) * _scale_value(sb)
                if SCALED and SRC_OUTER:
                    v = v * tl.load(qsrc_outer_ptr + r * (qsrc_c // 128) + col // 128, mask=m, other=0.0)
                if HAS_G:
                    v = v * tl.load(qsrc_g_ptr)
                best = tl.maximum(best, tl.where(m, tl.abs(v).to(tl.int32, bitcast=True), 0))
        else:
            # numel = elements of the dense source's memory (contiguous, or contiguous transposed)
            for start in range(pid * BLOCK, numel, NP_AMAX * BLOCK):
                i = start + offs
                m = i < numel
                x = tl.load(src_ptr + i.to(tl.int64), mask=m, other=0.0).to(tl.float32)
                best = tl.maximum(best, tl.where(m, tl.abs(x).to(tl.int32, bitcast=True), 0))
        tl.atomic_max(row_i32, tl.max(best, axis=0))
        # the saturated scale bytes, over the same program stride
        count = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(pid * BLOCK, n_scales, NP_AMAX * BLOCK):
            i = start + offs
            sb = tl.load(scales_ptr + i, mask=i < n_scales, other=0).to(tl.int32)
            count += ((sb & 0x7F) == 0x7E).to(tl.int32)
        tl.atomic_add(row_i32 + 1, tl.sum(count, axis=0))
    else:
        k = pid - NP_AMAX
        j = k // N_CHUNKS
        c = (k % N_CHUNKS) * CHUNK + tl.arange(0, CHUNK)
        r = tl.load(rows_ptr + j)
        in_c = c < C
        take = c < c_src
        if PACKED_SRC:
            # A[r, c] = value of q at (c, r): byte (c, r // 2), nibble r % 2, scale (c // br, r // 16)
            byte = tl.load(qsrc_ptr + c.to(tl.int64) * (qsrc_c // 2) + r // 2, mask=take, other=0).to(tl.int32)
            code = tl.where(r % 2 == 1, byte >> 4, byte & 15)
            sb = tl.load(qsrc_scales_ptr + (c // qsrc_block_rows) * (qsrc_c // 16) + r // 16, mask=take, other=0)
            x = e2m1_value(code) * _scale_value(sb)
            if SCALED:
                if SRC_OUTER:
                    x = x * tl.load(qsrc_outer_ptr + c * (qsrc_c // 128) + r // 128, mask=take, other=0.0)
                if HAS_G:
                    x = x * tl.load(qsrc_g_ptr)
        else:
            x = tl.load(src_ptr + r.to(tl.int64) * s_r + c.to(tl.int64) * s_c, mask=take, other=0.0).to(tl.float32)
        x = tl.where(take, x, 0.0)
        tl.store(row_ptr + off_src + j * C + c, x, mask=in_c)
        # packed row r as int32 words (C / 8 per row)
        w = (k % N_CHUNKS) * (CHUNK // 8) + tl.arange(0, CHUNK // 8)
        wm = w < C // 8
        words = tl.load(packed_ptr.to(tl.pointer_type(tl.int32)) + r.to(tl.int64) * (C // 8) + w, mask=wm, other=0)
        tl.store(row_i32 + off_q + j * (C // 8) + w, words, mask=wm)
        s = (k % N_CHUNKS) * (CHUNK // 16) + tl.arange(0, CHUNK // 16)
        sm = s < C // 16
        sb = tl.load(scales_ptr + (r // block_rows).to(tl.int64) * (C // 16) + s, mask=sm, other=0).to(tl.int32)
        tl.store(row_i32 + off_s + j * (C // 16) + s, sb, mask=sm)
        if OUTER:
            o = (k % N_CHUNKS) * (CHUNK // 128) + tl.arange(0, CHUNK // 128)
            om = o < C // 128
            ov = tl.load(outer_ptr + r.to(tl.int64) * (C // 128) + o, mask=om, other=0.0)
            tl.store(row_ptr + off_o + j * (C // 128) + o, ov, mask=om)


def observe(spec, arena, index: int) -> None:
    """Write observation row `index` of `arena` (stats.Observe `spec`; FP32 [rows, spec.layout.width],
    the row's words 0-1 zeroed) on the device: the kernel twin of stats.write_twin."""
    lay, q = spec.layout, spec.q
    dummy = arena
    if spec.packed_src is not None:
        p = spec.packed_src
        numel = p.packed.numel()
        flat, s_r, s_c = dummy, 0, 0
        qsrc = (p.packed, p.block_scales.view(torch.uint8),
                p.outer_scales if p.outer_scales is not None else dummy,
                p.tensor_scale if p.tensor_scale is not None else dummy, p.shape[1], p.block_rows)
        has_g = p.tensor_scale is not None
        src_outer = p.outer_scales is not None
    else:
        flat, (s_r, s_c) = spec.flat, spec.src_strides
        numel = flat.numel()
        qsrc = (dummy, dummy, dummy, dummy, 16, 1)
        has_g = src_outer = False
    scales = q.block_scales.view(torch.uint8)
    np_amax = max(1, min(MAX_AMAX_PROGRAMS, triton.cdiv(max(numel, scales.numel()), AMAX_BLOCK)))
    n_chunks = triton.cdiv(lay.cols, ROW_CHUNK)
    grid = (np_amax + lay.n * n_chunks,)
    _observe_kernel[grid](
        flat, s_r, s_c, numel, *qsrc,
        q.packed, scales, scales.numel(), q.outer_scales if q.outer_scales is not None else dummy,
        spec.row_index, lay.c_src, lay.cols, q.block_rows, arena, index * lay.width, lay.off_src, lay.off_q, lay.off_s, lay.off_o,
        np_amax, n_chunks, PACKED_SRC=spec.packed_src is not None, SCALED=spec.scaled, HAS_G=has_g,
        SRC_OUTER=src_outer, OUTER=q.outer_scales is not None, BLOCK=AMAX_BLOCK, CHUNK=ROW_CHUNK)
