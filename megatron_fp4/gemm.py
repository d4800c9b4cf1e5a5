"""Exact emulation of block-scaled GEMMs on BF16/FP32 hardware (numerics.md §7).

`matmul(a, b)` computes a @ b^T for two operands quantized along their shared inner dimension.

- Per-tensor-scaled NVFP4 (Quartet II, NVIDIA): e2m1*e4m3 is exact in BF16, so the GEMM runs on the
  exact unscaled operands with FP32 accumulation and the product of the two FP32 tensor scales is
  applied to the FP32 output (never folded into a BF16 operand).
- Double-block NVFP4 (TetraJet-v2): the outer FP32 scale varies per 128-slab of the inner dim on both
  operands. `exact` sums per-slab FP32 GEMMs scaled by s_out_a * s_out_b; `fp32` folds the outer
  scales into FP32 operands (TF32 off); `bf16` folds them into BF16 operands (<= 2^-9 relative).
- MXFP8: e4m3 * 2^k is exact in BF16; FP32 output.
"""
from __future__ import annotations

import torch

from .tensor import OUTER_BLOCK, MXFP8Tensor, NVFP4Tensor

GEMM_MODES = ("exact", "fp32", "bf16")


def _mm_exact_operands(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b^T with FP32 accumulation and FP32 output, for operands exact in BF16."""
    if a.is_cuda:
        try:
            return torch.mm(a.to(torch.bfloat16), b.to(torch.bfloat16).t(), out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            pass  # torch without the out_dtype overload: FP32 GEMM (TF32 is exact on <= 6-bit operands)
    return torch.mm(a.float(), b.float().t())


def _mm_fp32_no_tf32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if not a.is_cuda:
        return torch.mm(a, b.t())
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return torch.mm(a, b.t())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _check_pair(a, b):
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"inner dims differ: {tuple(a.shape)} vs {tuple(b.shape)}")


def matmul(a: NVFP4Tensor, b: NVFP4Tensor, mode: str = "exact") -> torch.Tensor:
    """FP32 [rows_a, rows_b] = dequant(a) @ dequant(b)^T, emulated as the hardware would compute it."""
    _check_pair(a, b)
    if mode not in GEMM_MODES:
        raise ValueError(f"gemm_emulation must be one of {GEMM_MODES}, got {mode!r}")
    double_block = a.outer_scales is not None
    if double_block != (b.outer_scales is not None):
        raise ValueError("cannot multiply a double-block operand with a per-tensor-scaled one")
    if not double_block:
        return _mm_exact_operands(a.dequantize_unscaled(), b.dequantize_unscaled()) * (
            a.tensor_scale * b.tensor_scale)
    if mode == "exact":
        a_unscaled, b_unscaled = a.dequantize_unscaled(), b.dequantize_unscaled()
        out = None
        for slab in range(a.shape[1] // OUTER_BLOCK):
            cols = slice(slab * OUTER_BLOCK, (slab + 1) * OUTER_BLOCK)
            partial = _mm_exact_operands(a_unscaled[:, cols], b_unscaled[:, cols])
            partial = partial * (a.outer_scales[:, slab, None] * b.outer_scales[None, :, slab])
            out = partial if out is None else out + partial
        return out
    if mode == "fp32":
        return _mm_fp32_no_tf32(a.dequantize(), b.dequantize())
    return _mm_exact_operands(a.dequantize().to(torch.bfloat16), b.dequantize().to(torch.bfloat16))


def matmul_mxfp8(a: MXFP8Tensor, b: MXFP8Tensor) -> torch.Tensor:
    _check_pair(a, b)
    return _mm_exact_operands(a.dequantize(), b.dequantize())
