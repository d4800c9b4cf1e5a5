"""Containers for quantized operands: NVFP4 (packed E2M1 + E4M3 block scales + FP32 scale(s)) and MXFP8.

A quantized operand is always 2-D, [rows, cols], with blocks running along the last dim (the GEMM's
inner dimension). Scales are stored row-major, one per block:

- 1x16 blocks: `block_scales` is [rows, cols/16];
- 16x16 tiles (NVIDIA weights): `block_scales` is [rows/16, cols/16] and `block_rows` = 16;
- per-tensor recipes carry one FP32 `tensor_scale` g;
- TetraJet-v2 double blocks carry `outer_scales` [rows, cols/128] in FP32 and no tensor scale.

`dequantize_unscaled()` gives e2m1 * e4m3, exact in BF16 (numerics.md §1.4); the FP32 tensor scale is
applied to GEMM outputs instead. Packed codes take half a byte per element, scales 1 byte per 16, so
a saved operand costs about 4.5 bits per element.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import format as fmt

BLOCK = 16
OUTER_BLOCK = 128


@dataclass
class NVFP4Tensor:
    packed: torch.Tensor                 # uint8 [rows, cols/2], low nibble = even element
    block_scales: torch.Tensor           # float8_e4m3fn [rows/block_rows, cols/16]
    tensor_scale: Optional[torch.Tensor]  # float32 scalar g, or None (double-block)
    outer_scales: Optional[torch.Tensor] = None  # float32 [rows, cols/128] (double-block) or None
    block_rows: int = 1
    # debug statistics, 0-d tensors (no host sync): non-zero blocks flushed to zero because their
    # scale underflowed, and MS-EDEN corrected scales clamped at 448 (non-zero indicates a bug)
    flushed_blocks: Optional[torch.Tensor] = None
    clamped_scales: Optional[torch.Tensor] = None
    # optional BF16 [rows, cols] = dequantize_unscaled(), written by a quantizer kernel for the GEMM
    # that consumes this operand next (that GEMM then skips the dequant pass). Transient: only
    # backward operands that never outlive their GEMM carry it; saved operands stay at 4.5 bits.
    operand: Optional[torch.Tensor] = None
    # with a double-block `operand` (dequantize() in BF16): 0-d FP32, NaN when the source held a
    # non-finite value (the outer scales carry that, the operand does not), else 1; the GEMM
    # epilogue multiplies by it so the result is NaN exactly when the reference's would be
    operand_poison: Optional[torch.Tensor] = None

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.packed.shape[0], self.packed.shape[1] * 2))

    @property
    def device(self):
        return self.packed.device

    def codes(self) -> torch.Tensor:
        return fmt.unpack_e2m1(self.packed)

    def row_block_scales(self) -> torch.Tensor:
        """Float32 scale per row and 16-block, [rows, cols/16] (16x16 tiles repeated over their rows)."""
        s = self.block_scales.float()
        return s.repeat_interleave(self.block_rows, dim=0) if self.block_rows > 1 else s

    def expanded_block_scales(self) -> torch.Tensor:
        """Float32 scale per element, [rows, cols]."""
        return self.row_block_scales().repeat_interleave(BLOCK, dim=1)

    def dequantize_unscaled(self) -> torch.Tensor:
        """e2m1(q) * e4m3(s) in float32; every value is exact in BF16."""
        return fmt.decode_e2m1(self.codes()) * self.expanded_block_scales()

    def dequantize(self) -> torch.Tensor:
        """The represented values in float32: q * s * g, or q * s_in * s_out for double blocks."""
        x = self.dequantize_unscaled()
        if self.outer_scales is not None:
            x = x * self.outer_scales.repeat_interleave(OUTER_BLOCK, dim=1)
        if self.tensor_scale is not None:
            x = x * self.tensor_scale
        return x

    def column_values(self, idx: torch.Tensor, scaled: bool = True) -> torch.Tensor:
        """dequantize()[:, idx] (scaled) or dequantize_unscaled()[:, idx], from those columns only (the
        statistics' sampled rows of a transposed operand: no pass over the whole tensor). Same
        products in the same order as the full dequantization, so the same bits."""
        idx = idx.to(self.packed.device)
        byte = self.packed.index_select(1, idx // 2)
        codes = torch.where((idx % 2 == 1)[None, :], byte >> 4, byte & 15)
        x = fmt.decode_e2m1(codes) * self.row_block_scales().index_select(1, idx // BLOCK)
        if scaled:
            if self.outer_scales is not None:
                x = x * self.outer_scales.index_select(1, idx // OUTER_BLOCK)
            if self.tensor_scale is not None:
                x = x * self.tensor_scale
        return x

    def represented_amax(self, scaled: bool = True) -> torch.Tensor:
        """dequantize().abs().amax() (scaled) or dequantize_unscaled().abs().amax(), 0-d float32, from
        each block's largest code magnitude: the scales are >= 0 and each product is monotonic in
        |q|, so the maximum of the products is the product of the maxima, bit for bit (NaN carried)."""
        mag = torch.maximum(self.packed & 7, (self.packed >> 4) & 7)
        rows, half = self.packed.shape
        top = mag.reshape(rows, half // (BLOCK // 2), BLOCK // 2).amax(dim=2)
        v = fmt.decode_e2m1(top) * self.row_block_scales()
        if scaled and self.outer_scales is not None:
            v = v * self.outer_scales.repeat_interleave(OUTER_BLOCK // BLOCK, dim=1)
        a = v.amax()
        if scaled and self.tensor_scale is not None:
            a = a * self.tensor_scale
        return a

    def nbytes(self) -> int:
        total = self.packed.numel() + self.block_scales.numel()
        if self.outer_scales is not None:
            total += self.outer_scales.numel() * 4
        if self.tensor_scale is not None:
            total += 4
        return total


@dataclass
class MXFP8Tensor:
    data: torch.Tensor        # float8_e4m3fn [rows, cols]
    scale_exponents: torch.Tensor  # int32 [rows, cols/32]: scale = 2^k (E8M0)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def scales(self) -> torch.Tensor:
        return torch.ldexp(torch.ones_like(self.scale_exponents, dtype=torch.float32),
                           self.scale_exponents)

    def dequantize(self) -> torch.Tensor:
        return self.data.float() * self.scales().repeat_interleave(fmt.MXFP8_BLOCK, dim=1)

    def nbytes(self) -> int:
        return self.data.numel() + self.scale_exponents.numel()


def pad_cols(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the last dim to a multiple (zeros change no amax and add nothing to products)."""
    extra = (-t.shape[-1]) % multiple
    return torch.nn.functional.pad(t, (0, extra)) if extra else t


def transpose_tiles(t: NVFP4Tensor) -> NVFP4Tensor:
    """Transpose a 16x16-tile operand: codes and tile scales transpose, values are identical."""
    if t.block_rows != 16:
        raise ValueError("only 16x16-tile operands can be transposed without re-quantization")
    codes = t.codes().t().contiguous()
    return NVFP4Tensor(packed=fmt.pack_e2m1(codes), block_scales=t.block_scales.t().contiguous(),
                       tensor_scale=t.tensor_scale, block_rows=16)
