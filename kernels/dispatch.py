"""One entry point per quantizer and GEMM: the Triton kernel where the backend config asks for it and
one covers the call, the torch twin otherwise (megatron_fp4/backend.py).

Every entry takes `backend` (a BackendConfig; None: backend.current()) and `site` ((recipe name,
operand), for fallback messages). Under kernels="auto" CUDA tensors run the kernels and other tensors
the twins; "reference" runs the twins everywhere; "interpret" runs the kernels on every tensor (CPU
ones in Triton's interpreter). A call that wants a kernel but is not covered by one (SR with 4/6,
SR on 16x16 tiles, RHT sizes other than 128 for MS-EDEN and 16 for the double block,
outer_block="tensor", rotated dims that are not multiples of 128, gemm_emulation="fp32") takes the twin
and is reported by backend.fallback (logged once per site, or raised under on_fallback="error"). Every
call returns exactly what the twin would (up to FP32 summation order in the rotation and the EDEN /
4/6 sums, see the kernel modules).
"""
from __future__ import annotations

import functools

import collections
from typing import Callable, Optional

import torch

from megatron_fp4 import format as fmt
from megatron_fp4 import quantizers as Q
from megatron_fp4.backend import BackendConfig, current, fallback, reference_only, wants_kernel  # noqa: F401
from megatron_fp4.gemm import matmul as _reference_matmul
from megatron_fp4.hadamard import rht
from megatron_fp4.rng import RandomStream, random_signs
from megatron_fp4.tensor import NVFP4Tensor, pad_cols
from megatron_fp4.tensor import transpose_tiles as _reference_transpose_tiles

AmaxReduce = Optional[Callable[[torch.Tensor], torch.Tensor]]
Site = Optional[tuple]


def _reference_rht(a: torch.Tensor, sigma: torch.Tensor, transpose: bool, pad_multiple: int) -> torch.Tensor:
    """The torch composition every rotating entry point falls back to: rht(pad_cols(A, pad_multiple),
    sigma) with A = a or a.t()."""
    return rht(pad_cols(a.t() if transpose else a, pad_multiple), sigma)


def _on_gpu(*tensors: torch.Tensor) -> bool:
    return all(t.is_cuda for t in tensors)


def kernels_enabled(*tensors: torch.Tensor, backend: Optional[BackendConfig] = None) -> bool:
    """Whether calls on these tensors want the kernels under `backend` (backend.wants_kernel): every
    tensor on CUDA under "auto", always under "interpret", never under "reference"."""
    return wants_kernel(backend or current(), _on_gpu(*tensors))


def _first(*checks) -> str:
    """The first reason whose condition holds: checks are (condition, reason) pairs."""
    return next((reason for bad, reason in checks if bad), "arguments outside the kernel's cases")


_SIGNS_CACHE: "collections.OrderedDict" = collections.OrderedDict()


def rht_signs(key, n: int, device) -> torch.Tensor:
    """rng.random_signs(key, n, device), the same values; `key` an int or a RandomStream (whose
    device state, if any, is folded in on the device).

    On CUDA: a stream with a state, or any key while a CUDA graph is being captured, runs one small
    kernel (graph-safe: a replay recomputes the signs from what the state holds then; never a host
    value frozen into the graph). Otherwise an int key is hashed on the host (about 35 tiny tensor ops:
    on the GPU each would be a kernel launch) and sent in one asynchronous copy from pinned memory.
    Outside a capture the last few vectors are kept, because every backward operand of a layer call
    uses the same signs (Quartet II: four operands; TetraJet-v2: two per vector); an entry for a
    stream with a state holds that state tensor and its version, so a rewrite misses."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    stream = key if isinstance(key, RandomStream) else None
    if device.type != "cuda":
        return random_signs(key, n, device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    device = torch.device("cuda", index)
    if torch.cuda.is_current_stream_capturing():
        from ._common import random_signs as kernel
        return kernel(stream if stream is not None else RandomStream(int(key)), n, device)
    if stream is not None and stream.state is None:
        stream, key = None, stream.key
    if stream is not None:
        cache_key = (stream.key, stream.roles, id(stream.state), stream.state._version, n, index)
    else:
        cache_key = (int(key), n, index)
    entry = _SIGNS_CACHE.get(cache_key)
    if entry is not None and (stream is None or entry[0] is stream.state):
        _SIGNS_CACHE.move_to_end(cache_key)
        return entry[1]
    if stream is not None:
        from ._common import random_signs as kernel
        sigma = kernel(stream, n, device)
    else:
        sigma = random_signs(int(key), n).pin_memory().to(device, non_blocking=True)
    _SIGNS_CACHE[cache_key] = (stream.state if stream is not None else None, sigma)
    while len(_SIGNS_CACHE) > 8:
        _SIGNS_CACHE.popitem(last=False)
    return sigma


def quantize_nvfp4(x: torch.Tensor, *, backend: Optional[BackendConfig] = None, site: Site = None,
                   for_gemm: bool = False, **kw) -> NVFP4Tensor:
    """Same signature and result as quantizers.quantize_nvfp4; 1x16 RN (+4/6), 1x16 SR (with a
    stream, without 4/6) and 16x16-tile RN (+4/6) run the kernel. for_gemm=True (an operand
    that goes straight into D.matmul and is not kept): the kernel also writes its BF16 GEMM operand."""
    be = backend or current()
    if wants_kernel(be, x.is_cuda):
        mode = kw.get("mode", Q.ROUND_NEAREST)
        stream, four_over_six = kw.get("stream"), kw.get("four_over_six", False)
        block_rows = kw.get("block_rows", 1)
        sr_ok = mode == Q.ROUND_STOCHASTIC and stream is not None and not four_over_six and block_rows == 1
        tiles_ok = block_rows == 1 or (block_rows == 16 and mode == Q.ROUND_NEAREST
                                       and x.dim() == 2 and x.shape[0] % 16 == 0)
        if ((mode == Q.ROUND_NEAREST or sr_ok) and tiles_ok and x.dim() == 2 and x.shape[1] % 16 == 0
                and x.numel() > 0):
            from .rtn import quantize_nvfp4_rtn
            return quantize_nvfp4_rtn(x, v=kw.get("v", 6.0), smax=kw.get("smax", 448.0),
                                      ties=kw.get("ties", fmt.TIES_EVEN), four_over_six=four_over_six,
                                      amax_reduce=kw.get("amax_reduce"), mode=mode, stream=stream,
                                      block_rows=block_rows,
                                      emit_operand=_emit_for_gemm(for_gemm, be) and block_rows == 1)
        fallback(be, site, _first(
            (x.dim() != 2, f"a {x.dim()}-D tensor"), (x.numel() == 0, "an empty tensor"),
            (x.shape[-1] % 16 != 0, f"{x.shape[-1]} columns, not a multiple of 16"),
            (mode not in (Q.ROUND_NEAREST, Q.ROUND_STOCHASTIC), f"rounding mode {mode!r}"),
            (mode == Q.ROUND_STOCHASTIC and stream is None, "stochastic rounding without a random stream"),
            (mode == Q.ROUND_STOCHASTIC and four_over_six, "stochastic rounding with Four Over Six"),
            (mode == Q.ROUND_STOCHASTIC and block_rows != 1, "stochastic rounding on 16x16 tiles"),
            (block_rows == 16 and x.shape[0] % 16 != 0, f"{x.shape[0]} rows, not a multiple of 16 (16x16 tiles)"),
            (block_rows not in (1, 16), f"block_rows={block_rows}")))
    return Q.quantize_nvfp4(x, **kw)


def _eden_reason(sigma, eden_group) -> str:
    return _first((eden_group not in (128, 16),
                   f"eden_group={eden_group} (the MS-EDEN kernels correct per 128 or per 16)"),
                  (sigma.numel() != 128, f"RHT size {sigma.numel()} (the MS-EDEN kernels rotate by 128)"))


def _eden_kernel(eden_group: int, for_gemm: bool, be: BackendConfig, smax: float):
    """The MS-EDEN kernel of `eden_group` as f(a, sigma, stream, **kw): per 128 (kernels/eden.py, which
    can also write the BF16 GEMM operand) or per 16 (kernels/eden16.py; its consumer dequantizes, and
    its tensor scale comes from max r / 256, so `smax` does not apply, as in the twin)."""
    if eden_group == 16:
        from .eden16 import rht_ms_eden16
        return rht_ms_eden16
    from .eden import rht_ms_eden as per128
    return functools.partial(per128, smax=smax, emit_operand=_emit_for_gemm(for_gemm, be))


def _emit_for_gemm(for_gemm: bool, be: BackendConfig) -> bool:
    """The quantizer kernel also writes the BF16 GEMM operand when the next GEMM is dequant + cuBLAS
    (the Triton GEMM reads packed operands itself): one dequant pass fewer per operand."""
    return _emit_double_block(for_gemm, be) and be.gemm == "cublas"


def rht_ms_eden(a: torch.Tensor, sigma: torch.Tensor, stream: RandomStream, *, transpose: bool = False,
                eden_group: int = 128, v: float = Q.EDEN_V, smax: float = 255.99,
                ties: str = fmt.TIES_EVEN, amax_reduce: AmaxReduce = None,
                pad_multiple: int = 1, for_gemm: bool = False, backend: Optional[BackendConfig] = None,
                site: Site = None) -> NVFP4Tensor:
    """MS-EDEN of A = a (or a.t()) after RHT with `sigma`, A's last dim zero-padded to pad_multiple.

    Reference: quantize_ms_eden(rht(pad_cols(A, pad_multiple), sigma), ...). for_gemm: the result goes
    straight into D.matmul and is not kept; the kernel then also writes its BF16 GEMM operand.
    """
    be = backend or current()
    if wants_kernel(be, a.is_cuda):
        if eden_group in (128, 16) and sigma.numel() == 128 and a.dim() == 2:
            kernel = _eden_kernel(eden_group, for_gemm, be, smax)
            if transpose:
                extra = (-a.shape[0]) % max(pad_multiple, 128)   # pad rows of a == columns of a.t()
                if extra:
                    a = torch.nn.functional.pad(a, (0, 0, 0, extra))
            else:
                extra = (-a.shape[1]) % max(pad_multiple, 128)
                if extra:
                    a = torch.nn.functional.pad(a, (0, extra))
            return kernel(a, sigma, stream, transpose=transpose, v=v, ties=ties, amax_reduce=amax_reduce)
        fallback(be, site, _first((a.dim() != 2, f"a {a.dim()}-D tensor"), (True, _eden_reason(sigma, eden_group))))
    return Q.quantize_ms_eden(_reference_rht(a, sigma, transpose, pad_multiple), stream=stream,
                              eden_group=eden_group, v=v, smax=smax, ties=ties, amax_reduce=amax_reduce)


def requant_ms_eden(q: NVFP4Tensor, sigma: torch.Tensor, stream: RandomStream, *,
                    eden_group: int = 128, v: float = Q.EDEN_V, smax: float = 255.99,
                    ties: str = fmt.TIES_EVEN, amax_reduce: AmaxReduce = None,
                    pad_multiple: int = 1, for_gemm: bool = False, backend: Optional[BackendConfig] = None,
                    site: Site = None) -> NVFP4Tensor:
    """Re-quantize a packed forward operand transposed: MS-EDEN(rht(dequantize_unscaled(q)^T, sigma)).

    The kernel reads packed codes and scales directly (unpack, transpose, rotate, quantize).
    for_gemm: as in rht_ms_eden.
    """
    be = backend or current()
    if wants_kernel(be, q.packed.is_cuda):
        rows = q.shape[0]
        if (eden_group in (128, 16) and sigma.numel() == 128 and q.block_rows == 1 and q.outer_scales is None
                and rows % 128 == 0):
            return _eden_kernel(eden_group, for_gemm, be, smax)(None, sigma, stream, packed=q, v=v, ties=ties,
                                                                amax_reduce=amax_reduce)
        fallback(be, site, _first((q.block_rows != 1, "a 16x16-tile operand"),
                                  (q.outer_scales is not None, "a double-block operand"),
                                  (rows % 128 != 0, f"{rows} rows, not a multiple of 128"),
                                  (True, _eden_reason(sigma, eden_group))))
    return Q.quantize_ms_eden(_reference_rht(q.dequantize_unscaled(), sigma, True, pad_multiple),
                              stream=stream, eden_group=eden_group, v=v, smax=smax, ties=ties,
                              amax_reduce=amax_reduce)


def _double_block_args_ok(mode, stream, outer_block) -> bool:
    return (outer_block in (128, "128") and mode in (Q.ROUND_NEAREST, Q.ROUND_STOCHASTIC)
            and (mode == Q.ROUND_NEAREST or stream is not None))


def _double_block_reason(mode, stream, outer_block, sigma=None) -> str:
    return _first((outer_block not in (128, "128"), f"outer_block={outer_block!r}"),
                  (mode not in (Q.ROUND_NEAREST, Q.ROUND_STOCHASTIC), f"rounding mode {mode!r}"),
                  (mode == Q.ROUND_STOCHASTIC and stream is None, "stochastic rounding without a random stream"),
                  (sigma is not None and sigma.numel() != 16,
                   f"RHT size {sigma.numel() if sigma is not None else 0} (the double-block kernel rotates by 16)"))


def _emit_double_block(for_gemm: bool, be: BackendConfig) -> bool:
    """for_gemm on a double-block operand means: the next GEMM is the "bf16" emulation (dequant +
    cuBLAS), so the kernel also writes dequantize().to(bf16) for it. emit_operands=False
    (MEGATRON_FP4_EMIT_OPERANDS=0) turns writing operands off everywhere (benchmarks time both)."""
    return for_gemm and be.emit_operands


def quantize_double_block(x: torch.Tensor, *, backend: Optional[BackendConfig] = None, site: Site = None,
                          for_gemm: bool = False, **kw) -> NVFP4Tensor:
    """Same signature and result as quantizers.quantize_double_block; outer_block=128 (RN or SR)
    runs the kernel (amax_reduce only concerns outer_block="tensor", which takes the reference).
    for_gemm=True: the operand goes straight into a "bf16"-mode GEMM (see _emit_double_block)."""
    be = backend or current()
    if wants_kernel(be, x.is_cuda):
        mode, stream, outer_block = kw.get("mode", Q.ROUND_NEAREST), kw.get("stream"), kw.get("outer_block", 128)
        if (_double_block_args_ok(mode, stream, outer_block) and x.dim() == 2 and x.numel() > 0
                and x.shape[1] % 128 == 0):
            from .double_block import quantize_double_block as kernel
            return kernel(x, mode=mode, ties=kw.get("ties", fmt.TIES_EVEN), stream=stream,
                          sr_headroom=kw.get("sr_headroom", 1.0), emit_operand=_emit_double_block(for_gemm, be))
        fallback(be, site, _first((x.dim() != 2, f"a {x.dim()}-D tensor"), (x.numel() == 0, "an empty tensor"),
                                  (x.shape[-1] % 128 != 0, f"{x.shape[-1]} columns, not a multiple of 128"),
                                  (True, _double_block_reason(mode, stream, outer_block))))
    return Q.quantize_double_block(x, **kw)


def rht_double_block(a: torch.Tensor, sigma: torch.Tensor, stream: Optional[RandomStream], *,
                     transpose: bool = False, mode: str = Q.ROUND_STOCHASTIC, ties: str = fmt.TIES_EVEN,
                     sr_headroom: float = 1.0, pad_multiple: int = 1, outer_block=128,
                     amax_reduce: AmaxReduce = None, for_gemm: bool = False,
                     backend: Optional[BackendConfig] = None, site: Site = None) -> NVFP4Tensor:
    """QDB of A = a (or a.t()) after RHT with `sigma`, A's last dim zero-padded to pad_multiple.

    Reference: quantize_double_block(rht(pad_cols(A, pad_multiple), sigma), mode, ties, stream,
    sr_headroom, outer_block, amax_reduce). The kernel (RHT-16, outer_block=128) reads a once,
    transposed in registers and padded by masking, and writes codes and both scale levels.
    """
    be = backend or current()
    if wants_kernel(be, a.is_cuda):
        padded = None
        if (_double_block_args_ok(mode, stream, outer_block) and sigma.numel() == 16 and a.dim() == 2
                and a.numel() > 0):
            cols = a.shape[0] if transpose else a.shape[1]
            padded = cols + (-cols) % max(pad_multiple, 1)
            if padded % 128 == 0:
                from .double_block import quantize_double_block as kernel
                return kernel(a, mode=mode, ties=ties, stream=stream, sr_headroom=sr_headroom, sigma=sigma,
                              transpose=transpose, pad_multiple=pad_multiple,
                              emit_operand=_emit_double_block(for_gemm, be))
        fallback(be, site, _first((a.dim() != 2, f"a {a.dim()}-D tensor"), (a.numel() == 0, "an empty tensor"),
                                  (padded is not None, f"rotated dim padded to {padded}, not a multiple of 128"),
                                  (True, _double_block_reason(mode, stream, outer_block, sigma))))
    return Q.quantize_double_block(_reference_rht(a, sigma, transpose, pad_multiple), mode=mode, ties=ties,
                                   stream=stream, sr_headroom=sr_headroom, outer_block=outer_block,
                                   amax_reduce=amax_reduce)


def requant_double_block(q: NVFP4Tensor, sigma: torch.Tensor, stream: Optional[RandomStream], *,
                         mode: str = Q.ROUND_STOCHASTIC, ties: str = fmt.TIES_EVEN, sr_headroom: float = 1.0,
                         pad_multiple: int = 1, outer_block=128, amax_reduce: AmaxReduce = None,
                         for_gemm: bool = False, backend: Optional[BackendConfig] = None,
                         site: Site = None) -> NVFP4Tensor:
    """QDB of rht(pad_cols(q.dequantize().t(), pad_multiple), sigma): TetraJet-v2's W^T / X^T from the
    saved forward operand. The kernel reads q packed (codes, inner and outer scales) instead of an
    FP32 dequantization written and read back; elsewhere the reference composition."""
    be = backend or current()
    if wants_kernel(be, q.packed.is_cuda):
        rows = q.shape[0]
        padded = rows + (-rows) % max(pad_multiple, 1)
        if (_double_block_args_ok(mode, stream, outer_block) and sigma.numel() == 16
                and _double_block_operand_ok(q) and padded % 128 == 0):
            from .double_block import quantize_double_block as kernel
            return kernel(None, mode=mode, ties=ties, stream=stream, sr_headroom=sr_headroom, sigma=sigma,
                          transpose=True, pad_multiple=pad_multiple, packed_source=q,
                          emit_operand=_emit_double_block(for_gemm, be))
        fallback(be, site, _first((not _double_block_operand_ok(q), _double_block_operand_reason(q)),
                                  (padded % 128 != 0, f"rotated dim padded to {padded}, not a multiple of 128"),
                                  (True, _double_block_reason(mode, stream, outer_block, sigma))))
    return Q.quantize_double_block(_reference_rht(q.dequantize(), sigma, True, pad_multiple), mode=mode, ties=ties,
                                   stream=stream, sr_headroom=sr_headroom, outer_block=outer_block,
                                   amax_reduce=amax_reduce)


def rht_of(a: torch.Tensor, sigma: torch.Tensor, *, transpose: bool = False,
           pad_multiple: int = 1, backend: Optional[BackendConfig] = None, site: Site = None) -> torch.Tensor:
    """FP32 rht(pad_cols(A, pad_multiple), sigma) with A = a or a.t(). With 16 signs and a padded
    rotated dim that is a multiple of 128, the double-block module's fused kernel reads `a` once
    (transposed and padded in registers) instead of a transposed copy, a pad and a small-K GEMM;
    equal to the reference up to FP32 summation order in the rotation (relative error < 1e-6)."""
    be = backend or current()
    if wants_kernel(be, a.is_cuda):
        cols = a.shape[0] if transpose else a.shape[-1]
        padded = cols + (-cols) % max(pad_multiple, 1)
        if sigma.numel() == 16 and a.dim() == 2 and a.numel() > 0 and padded % 128 == 0:
            from .double_block import rht16
            return rht16(a, sigma, transpose=transpose, pad_multiple=pad_multiple)
        fallback(be, site, _first((a.dim() != 2, f"a {a.dim()}-D tensor"), (a.numel() == 0, "an empty tensor"),
                                  (sigma.numel() != 16, f"RHT size {sigma.numel()} (the fused rotation is RHT-16)"),
                                  (True, f"rotated dim padded to {padded}, not a multiple of 128")))
    return _reference_rht(a, sigma, transpose, pad_multiple)


def dequantize_unscaled(q: NVFP4Tensor, *, backend: Optional[BackendConfig] = None,
                        site: Site = None) -> torch.Tensor:
    """e2m1*e4m3 values: BF16 from the kernel (exact), FP32 from the reference elsewhere; the operand
    a quantizer kernel already wrote (q.operand) where there is one."""
    if q.operand is not None and q.outer_scales is None:
        return q.operand
    be = backend or current()
    if wants_kernel(be, q.packed.is_cuda):
        if q.block_rows in (1, 16) and q.shape[0] % q.block_rows == 0:
            from .dequant import dequantize_unscaled_bf16
            return dequantize_unscaled_bf16(q)
        fallback(be, site, f"block_rows={q.block_rows} with {q.shape[0]} rows")
    return q.dequantize_unscaled()


def _double_block_operand_ok(q: NVFP4Tensor) -> bool:
    return (q.outer_scales is not None and q.block_rows == 1 and q.tensor_scale is None
            and q.shape[1] % 128 == 0)


def _double_block_operand_reason(q: NVFP4Tensor) -> str:
    return _first((q.outer_scales is None, "a per-tensor-scaled operand (the kernel reads double blocks)"),
                  (q.block_rows != 1, "a 16x16-tile operand"),
                  (q.tensor_scale is not None, "a double-block operand with a tensor scale"),
                  (q.shape[1] % 128 != 0, f"{q.shape[1]} columns, not a multiple of 128"))


def dequantize(q: NVFP4Tensor, dtype: torch.dtype = torch.float32, *, backend: Optional[BackendConfig] = None,
               site: Site = None) -> torch.Tensor:
    """q.dequantize().to(dtype), the same bits; one kernel pass for double-block operands."""
    be = backend or current()
    if wants_kernel(be, q.packed.is_cuda):
        if _double_block_operand_ok(q) and dtype in (torch.float32, torch.bfloat16):
            from .dequant import dequantize_double_block
            return dequantize_double_block(q, dtype)
        fallback(be, site, _first((not _double_block_operand_ok(q), _double_block_operand_reason(q)),
                                  (True, f"output dtype {dtype}")))
    out = q.dequantize()
    return out if dtype == torch.float32 else out.to(dtype)


def transpose_tiles(t: NVFP4Tensor, *, backend: Optional[BackendConfig] = None, site: Site = None) -> NVFP4Tensor:
    """tensor.transpose_tiles (a 16x16-tile operand transposed, same values): one kernel pass over the
    packed codes."""
    be = backend or current()
    if wants_kernel(be, t.packed.is_cuda) and t.block_rows == 16:
        if t.shape[0] % 16 == 0 and t.shape[1] % 16 == 0:
            from .dequant import transpose_tiles as kernel
            return kernel(t)
        fallback(be, site, f"shape {tuple(t.shape)}, not a multiple of 16 on both dims")
    return _reference_transpose_tiles(t)   # raises for operands that are not 16x16 tiles


def _mm_fp32_out(a16: torch.Tensor, b16: torch.Tensor) -> torch.Tensor:
    """a16 @ b16^T with FP32 output for operands exact in BF16: cuBLAS BF16 x BF16 -> FP32; an FP32
    GEMM where that overload is missing (CPU, interpreter runs), the same values."""
    try:
        return torch.mm(a16, b16.t(), out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return torch.mm(a16.float(), b16.float().t())


GEMM_BACKENDS = ("cublas", "triton")


def gemm_backend(backend: Optional[BackendConfig] = None) -> str:
    """How per-tensor-scaled NVFP4 GEMMs run on the kernel path (BackendConfig.gemm,
    MEGATRON_FP4_GEMM):

    - "cublas" (default): the dequant kernel writes both operands as exact BF16, cuBLAS multiplies
      them with FP32 output, one epilogue pass applies the scales and the output cast;
    - "triton": kernels/gemm.py reads the packed operands, dequantizes in registers and writes the
      scaled output dtype directly.
    Both are exact emulations (same operands, FP32 accumulation; only the summation order differs).
    The default stays cuBLAS until the benchmark (benchmarks/bench_kernels.py, which times both per
    shape) has shown the Triton kernel faster on the GPU; double-block "exact" GEMMs always use the
    Triton kernel (the alternative is one cuBLAS call and two FP32 passes per 128-slab)."""
    return (backend or current()).gemm


def matmul(a: NVFP4Tensor, b: NVFP4Tensor, mode: str = "exact", *, scale: Optional[torch.Tensor] = None,
           out_dtype: Optional[torch.dtype] = None, backend: Optional[BackendConfig] = None,
           site: Site = None) -> torch.Tensor:
    """gemm.matmul through the kernels where the backend asks for them; everything else goes to
    gemm.matmul.

    `scale` (an extra FP32 tensor scale, e.g. the forward g of a re-quantized operand) and `out_dtype`
    fold what callers do next into the one epilogue: the result equals
    (gemm.matmul(a, b, mode) * scale).to(out_dtype) — bit for bit wherever the FP32 sums are exact,
    and up to FP32 summation order otherwise.

    - per-tensor-scaled 1x16 / 16x16 operands: BackendConfig.gemm picks dequant + cuBLAS or the Triton
      GEMM on packed operands;
    - double-block, mode "exact": the Triton GEMM (per-slab partials scaled by the outer scales);
    - double-block, mode "bf16": the double-block dequant kernel (outer scales folded into BF16
      operands) + cuBLAS.
    """
    be = backend or current()
    same_kind = (a.outer_scales is None) == (b.outer_scales is None) and a.shape[1] == b.shape[1]
    if same_kind and wants_kernel(be, a.packed.is_cuda and b.packed.is_cuda):
        tiles_ok = all(t.block_rows in (1, 16) and t.shape[0] % t.block_rows == 0 for t in (a, b))
        if a.outer_scales is None and tiles_ok:
            if be.gemm == "triton":
                from .gemm import nvfp4_matmul
                return nvfp4_matmul(a, b, scale=scale, out_dtype=out_dtype or torch.float32)
            from .dequant import scale_cast
            a16, b16 = dequantize_unscaled(a, backend=be, site=site), dequantize_unscaled(b, backend=be, site=site)
            a.operand = b.operand = None   # single use: a saved forward operand must not keep its BF16 copy
            return scale_cast(_mm_fp32_out(a16, b16), a.tensor_scale, b.tensor_scale, scale,
                              out_dtype or torch.float32)
        both_double_block = _double_block_operand_ok(a) and _double_block_operand_ok(b)
        if mode == "exact" and both_double_block:
            from .gemm import nvfp4_matmul
            return nvfp4_matmul(a, b, scale=scale, out_dtype=out_dtype or torch.float32)
        if mode == "bf16" and both_double_block:
            # gemm.matmul's "bf16" mode for double-block operands: outer scales folded into BF16 operands
            # (dequantize().to(bf16)), BF16 GEMM with FP32 output. Each operand comes from its quantizer
            # (with the non-finite poison its outer scales carry) or from the dequant kernel; one
            # epilogue pass multiplies by the poisons (exact: 1 or NaN) and the scale and casts
            from .dequant import scale_cast
            one = fmt.device_constant(1.0, device=a.packed.device)
            operands, poisons = [], []
            for q in (a, b):
                if q.operand is not None:
                    operands.append(q.operand)
                    poisons.append(q.operand_poison if q.operand_poison is not None else one)
                else:
                    operands.append(dequantize(q, torch.bfloat16, backend=be, site=site))
                    poisons.append(one)
                q.operand = q.operand_poison = None   # single use
            return scale_cast(_mm_fp32_out(operands[0], operands[1]), poisons[0], poisons[1], scale,
                              out_dtype or torch.float32)
        fallback(be, site, _first(
            (a.outer_scales is None, "per-tensor operands with block_rows "
                                     f"{a.block_rows}/{b.block_rows} and rows {a.shape[0]}/{b.shape[0]}"),
            (not both_double_block, _double_block_operand_reason(a if not _double_block_operand_ok(a) else b)),
            (True, f"gemm_emulation={mode!r} (kernels cover 'exact' and 'bf16')")))
    out = _reference_matmul(a, b, mode)
    if scale is not None:
        out = out * scale
    return out if out_dtype is None else out.to(out_dtype)


# Quantization statistics (issue #19, megatron_fp4/stats.py): on a statistics iteration every quantizer
# entry above reports its operand and source; on any other call the wrapper tests one module flag.
from megatron_fp4 import stats as _stats  # noqa: E402  (after the entries it wraps)


def _observation_reason(spec) -> Optional[str]:
    """Why kernels/stats.observe cannot write this observation's row, or None."""
    q = spec.q
    if spec.packed_src is not None:
        p = spec.packed_src
        if not (p.packed.is_contiguous() and p.block_scales.is_contiguous()):
            return "a non-contiguous packed source"
    elif spec.flat is None:
        return "a source that is neither contiguous nor a contiguous tensor's transpose"
    if not (q.packed.is_contiguous() and q.block_scales.is_contiguous()) or q.packed.data_ptr() % 4:
        return "a non-contiguous or unaligned packed operand"
    return None


def write_observation(spec, arena: torch.Tensor, index: int) -> None:
    """One statistics row: kernels/stats.observe (one launch) where the backend wants kernels on this
    operand's device and the layout allows it, stats.write_twin otherwise (with backend.fallback)."""
    be = current()
    if wants_kernel(be, spec.q.packed.is_cuda):
        reason = _observation_reason(spec)
        if reason is None:
            from .stats import observe
            observe(spec, arena, index)
            return
        fallback(be, ("statistics", "observation"), reason)
    _stats.write_twin(spec, arena, index)


quantize_nvfp4 = _stats.observing(quantize_nvfp4, _stats.plain_source, write=write_observation)
quantize_double_block = _stats.observing(quantize_double_block, _stats.plain_source, write=write_observation)
rht_ms_eden = _stats.observing(rht_ms_eden, _stats.rotated_source, eden=True, write=write_observation)
rht_double_block = _stats.observing(rht_double_block, _stats.rotated_source, write=write_observation)
requant_ms_eden = _stats.observing(requant_ms_eden, _stats.requant_unscaled_source, eden=True,
                                   write=write_observation)
requant_double_block = _stats.observing(requant_double_block, _stats.requant_scaled_source,
                                        write=write_observation)
