"""Every quantizer of the spec (numerics.md §2-§5), as pure-torch reference functions.

All quantizers take a 2-D operand [rows, cols] and form blocks along the last dim (the GEMM's inner
dimension); a caller quantizing "along" another dimension transposes first. Arithmetic is FP32 and
follows the spec's order of operations (e.g. y = x / (s_b * g) with the divisor formed first), because
other orders change the last bit of y and so the outcome at ties.

These functions are the reference twins of the Triton kernels in `kernels/`.

Special values (a documented choice; tested in tests/test_quantizers.py):
- an all-zero operand gives zero codes, zero scales and g = 1;
- a block whose scale rounds to 0, or whose divisor s_b * g is below 2^-126, is flushed to zero;
- an operand whose tensor scale g would be below 2^-126 (amax below ~3e-35) is flushed to zero;
- NaN or +-Inf anywhere in an operand makes its FP32 scale NaN, so every value it represents is NaN and
  the non-finite value propagates through the GEMM to Megatron's NaN / loss-scale checks, instead of
  being silently rounded away.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from . import format as fmt
from .rng import RandomStream
from .tensor import BLOCK, OUTER_BLOCK, MXFP8Tensor, NVFP4Tensor

AmaxReduce = Optional[Callable[[torch.Tensor], torch.Tensor]]

ROUND_NEAREST = "rn"
ROUND_STOCHASTIC = "sr"
SR_HEADROOM = 17.0 / 16.0
FOUR_OVER_SIX_SMAX = 256.0
EDEN_V = 6.0 / (SR_HEADROOM * 0.93)


def _check_operand(x: torch.Tensor, multiple: int, what: str = "operand", rows_multiple: int = 1):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point() or x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(f"{what} must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{what} must be 2-D [rows, cols], got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{what} is empty (shape {tuple(x.shape)})")
    if x.shape[1] % multiple:
        raise ValueError(f"{what}: the quantized dim ({x.shape[1]}) must be a multiple of {multiple}")
    if x.shape[0] % rows_multiple:
        raise ValueError(f"{what}: rows ({x.shape[0]}) must be a multiple of {rows_multiple}")


def _poison_nonfinite(x: torch.Tensor) -> torch.Tensor:
    """1.0 if every element is finite, NaN otherwise (a scalar to multiply into the FP32 scale)."""
    finite = torch.isfinite(x).all()
    return torch.where(finite, torch.ones((), device=x.device), torch.full((), float("nan"), device=x.device))


def _finite_amax(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x.abs(), torch.zeros((), device=x.device)).amax()


def _tensor_scale(amax: torch.Tensor, smax: float, v: float):
    """g = amax / (Smax * v) in FP32; returns (g, valid) with g = 1 where the operand flushes to zero."""
    g = amax.float() / fmt.device_constant(float(smax * v), device=amax.device)
    valid = g >= fmt.FP32_MIN_NORMAL
    return torch.where(valid, g, torch.ones_like(g)), valid


def div_scalar(t: torch.Tensor, v: float) -> torch.Tensor:
    """t / v with IEEE division on every device: torch's CUDA kernel turns division by a Python scalar
    into multiplication by its reciprocal (a different last bit), division by a tensor it does not."""
    return t / fmt.device_constant(float(v), device=t.device)


def _blocks(x: torch.Tensor, block_rows: int = 1) -> torch.Tensor:
    """View [R, C] as [R/br, br, C/16, 16]."""
    rows, cols = x.shape
    return x.reshape(rows // block_rows, block_rows, cols // BLOCK, BLOCK)


def _block_amax(xb: torch.Tensor) -> torch.Tensor:
    return xb.abs().amax(dim=(1, 3))  # [R/br, C/16]


def _expand(s: torch.Tensor) -> torch.Tensor:
    """Per-block [R/br, C/16] -> broadcastable to the [R/br, br, C/16, 16] block view."""
    return s[:, None, :, None]


def encode_rn(y: torch.Tensor, ties: str) -> torch.Tensor:
    """RN4: signed 4-bit codes of y rounded to nearest (saturating at +-6)."""
    mag = fmt.round_to_e2m1_code(y.abs(), ties)
    return fmt.signed_codes(mag, y < 0)


def encode_sr(y: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """SR4: round |y| up to the next grid value with probability (|y| - lo)/(hi - lo); clip at 6."""
    mag = y.abs().clamp(max=fmt.E2M1_MAX)
    lo_code = fmt.e2m1_lower_code(mag)
    hi_code = (lo_code + 1).clamp(max=7)
    lo = fmt.code_to_magnitude(lo_code)
    hi = fmt.code_to_magnitude(hi_code)
    gap = hi - lo
    prob_up = torch.where(gap > 0, (mag - lo) / torch.where(gap > 0, gap, torch.ones_like(gap)),
                          torch.zeros_like(mag))
    code = torch.where(uniform < prob_up, hi_code, lo_code)
    return fmt.signed_codes(code, y < 0)


def _encode(y: torch.Tensor, mode: str, ties: str, stream: Optional[RandomStream]) -> torch.Tensor:
    if mode == ROUND_NEAREST:
        return encode_rn(y, ties)
    if mode == ROUND_STOCHASTIC:
        if stream is None:
            raise ValueError("stochastic rounding needs a RandomStream")
        rows, cols = y.shape
        return encode_sr(y, stream.uniform(rows, cols, y.device))
    raise ValueError(f"rounding mode must be 'rn' or 'sr', got {mode!r}")


def _pack(codes_blocks: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return fmt.pack_e2m1(codes_blocks.reshape(rows, cols))


def nvfp4_block_scales(block_amax: torch.Tensor, target: float, g: torch.Tensor, valid: torch.Tensor):
    """Block scales of Q16 for blocks with the given amaxes: s_b = RN8((amax_b / v) / g).

    Returns (scale as FP32, 0 where flushed; divisor s_b * g, 1 where flushed; keep mask). Blocks
    flush when the scale rounds to 0 or the divisor is below 2^-126. Shared by the quantizer and by
    OsciReset's sharded re-quantization, so both use exactly the same arithmetic.
    """
    scale = fmt.round_to_e4m3(div_scalar(block_amax, target) / g).float()
    divisor = scale * g
    keep = (scale > 0) & (divisor >= fmt.FP32_MIN_NORMAL) & valid
    return (torch.where(keep, scale, torch.zeros_like(scale)),
            torch.where(keep, divisor, torch.ones_like(divisor)), keep)


def four_over_six_sse(x: torch.Tensor, candidate: torch.Tensor, g: torch.Tensor, dims=None) -> torch.Tensor:
    """Squared errors of a 4/6 candidate against the original values (§3.2): (x - candidate * g)^2 in
    FP64, `candidate` the block's unscaled dequantized values e2m1(q) * e4m3(s) (FP32, exact) and g
    the FP32 tensor scale. Every step before the square is exact, so the error is that of the real
    numbers: candidate * g has at most 6 + 24 significant bits, and x - candidate * g needs at most
    ~33 of FP64's 53, because its two terms are within a factor 2 of each other unless one is 0 (once
    q != 0, RN to E2M1 keeps q * s * g within about [2/3 |x|, 2 |x|], saturation included). Only the
    square rounds (once, IEEE). Summed over `dims` (row dim, column dim of a block) if given, in a
    fixed order: the halving tree (pairwise_sum) over the block's 16 columns, then over its rows. The
    RTN kernel forms the same exact errors and adds in the same order, so both make the same 4/6
    choice even where the two candidates' sums are within FP64 rounding of each other.
    Working in units of g instead (fl32(x / g) - candidate) rounds x / g first, which misorders
    candidates whose SSEs differ by less than that rounding when g is not a power of two."""
    err = x.double() - candidate.double() * g.double()
    err = err * err
    if dims is None:
        return err
    row_dim, col_dim = dims
    return pairwise_sum(pairwise_sum(err, col_dim), row_dim)


def double_block_scales(block_amax: torch.Tensor, outer_amax: torch.Tensor, v: float):
    """QDB scales (§3.4) for 16-blocks with amax `block_amax` inside outer blocks with amax
    `outer_amax` (same shape: the outer amax repeated per 16-block).

    Returns (s_in as FP32, 0 where flushed; s_out; divisor s_in * s_out, 1 where flushed; keep).
    """
    s_out = outer_amax / fmt.device_constant(float(fmt.E4M3_MAX * v), device=outer_amax.device)
    s_out = torch.where(outer_amax > 0, s_out, torch.ones_like(s_out))
    t = div_scalar(block_amax / s_out, v)
    t = torch.where(t == 0, torch.full_like(t, fmt.E4M3_MIN_SUBNORMAL), t)
    s_in = fmt.round_to_e4m3(torch.clamp(t, max=fmt.E4M3_MAX)).float()
    divisor = s_in * s_out
    keep = (s_in > 0) & (divisor >= fmt.FP32_MIN_NORMAL)
    return (torch.where(keep, s_in, torch.zeros_like(s_in)), s_out,
            torch.where(keep, divisor, torch.ones_like(divisor)), keep)


# ---------------------------------------------------------------------------------------------
# Generic NVFP4 quantizer with an FP32 tensor scale (§3.1), 4/6 (§3.2) and 16x16 tiles (§3.3)
# ---------------------------------------------------------------------------------------------

def quantize_nvfp4(
    x: torch.Tensor,
    *,
    mode: str = ROUND_NEAREST,
    v: float = 6.0,
    smax: float = 448.0,
    ties: str = fmt.TIES_EVEN,
    stream: Optional[RandomStream] = None,
    four_over_six: bool = False,
    block_rows: int = 1,
    amax_reduce: AmaxReduce = None,
) -> NVFP4Tensor:
    """Q16(x; v, Smax, mode): 1x16 (or 16x16 with block_rows=16) E4M3 block scales, FP32 tensor scale.

    four_over_six: per block, try "max->6" and "max->4" scales with RN4 and keep the lower SSE (ties go
    to max->6); forward only, never with SR (choosing after SR biases the estimator). The caller sets
    Smax = 256 for 4/6, as the recipes do.
    """
    if block_rows not in (1, BLOCK):
        raise ValueError(f"block_rows must be 1 or 16, got {block_rows}")
    if mode not in (ROUND_NEAREST, ROUND_STOCHASTIC):
        raise ValueError(f"rounding mode must be 'rn' or 'sr', got {mode!r}")
    _check_operand(x, BLOCK, rows_multiple=block_rows)
    if four_over_six and mode != ROUND_NEAREST:
        raise ValueError("4/6 cannot be combined with stochastic rounding (it biases the estimator)")
    rows, cols = x.shape
    x = x.float()
    poison = _poison_nonfinite(x)
    amax = _finite_amax(x)
    if amax_reduce is not None:
        amax = amax_reduce(amax)
    g, valid = _tensor_scale(amax, smax, v)
    xb = _blocks(x, block_rows)
    xb = torch.where(torch.isfinite(xb), xb, torch.zeros((), device=x.device))
    block_amax = _block_amax(xb)

    def scale_and_codes(target: float):
        scale, divisor, keep = nvfp4_block_scales(block_amax, target, g, valid)
        # flushed blocks get codes 0 as well as scale 0 (§3.1)
        y = torch.where(_expand(keep), xb / _expand(divisor), torch.zeros((), device=x.device))
        if mode == ROUND_STOCHASTIC:
            codes = _encode(y.reshape(rows, cols), mode, ties, stream).reshape(y.shape)
        else:
            codes = encode_rn(y, ties)
        return scale.to(torch.float8_e4m3fn), codes, keep

    scales, codes, keep = scale_and_codes(v)
    if four_over_six:
        scales4, codes4, keep4 = scale_and_codes(4.0)
        # SSE against the original block values in FP64 (no overflow: |x| < 2^128, squares < 2^257).
        # Exact ties are common (s4 = 1.5 s6 puts both candidates on shared grid points) and must go
        # to max->6: identical candidates give identical exact errors, so identical sums. Each error
        # is exact, its square rounds once, and the FP64 sums run in the kernel's fixed order.
        sse6 = four_over_six_sse(xb, fmt.decode_e2m1(codes) * _expand(scales.float()), g, dims=(1, 3))
        sse4 = four_over_six_sse(xb, fmt.decode_e2m1(codes4) * _expand(scales4.float()), g, dims=(1, 3))
        use4 = sse4 < sse6
        scales = torch.where(use4, scales4.float(), scales.float()).to(torch.float8_e4m3fn)
        codes = torch.where(_expand(use4), codes4, codes)
        keep = torch.where(use4, keep4, keep)
    flushed = ((~keep) & (block_amax > 0)).sum()
    return NVFP4Tensor(
        packed=_pack(codes, rows, cols),
        block_scales=scales.reshape(rows // block_rows, cols // BLOCK),
        tensor_scale=g * poison,
        block_rows=block_rows,
        flushed_blocks=flushed,
    )


# ---------------------------------------------------------------------------------------------
# MS-EDEN (§5): RN4 elements, EDEN correction folded into stochastically rounded E4M3 scales
# ---------------------------------------------------------------------------------------------

def quantize_ms_eden(
    z: torch.Tensor,
    *,
    stream: RandomStream,
    eden_group: int = 128,
    v: float = EDEN_V,
    smax: float = 255.99,
    ties: str = fmt.TIES_EVEN,
    amax_reduce: AmaxReduce = None,
) -> NVFP4Tensor:
    """MS-EDEN of an already-rotated operand z (RHT-128 along its last dim, same sigma as its partner).

    eden_group=128: the per-128 correction of the reference path (§5.2);
    eden_group=16: the per-16 correction of the production kernel (§5.3).
    The scale-SR draws are one uniform per 16-block, counter = (global row, global col of the block).
    `clamped_scales` counts corrected scales clamped at 448 (non-zero indicates a bug).
    """
    if eden_group == 128:
        return _ms_eden_per128(z, stream, v, smax, ties, amax_reduce)
    if eden_group == 16:
        return _ms_eden_per16(z, stream, v, ties, amax_reduce)
    raise ValueError(f"eden_group must be 128 or 16, got {eden_group}")


def _scale_uniforms(stream: RandomStream, rows: int, cols: int, device) -> torch.Tensor:
    return stream.uniform(rows, cols // BLOCK, device, col_step=BLOCK)


def pairwise_sum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over `dim` (n long, a power of two) as a halving tree: x[c] + x[c + n/2] for c < n/2, then
    the same on the n/2 results, down to one. Each step is one IEEE add of two operands, whose result
    no implementation can change, so every implementation following this tree (the MS-EDEN kernel
    does) gets the same bits; torch.sum's and tl.sum's orders are their libraries' own. Our choice for
    the EDEN factor's sums, where the spec leaves the order open (halving, because it is the cheaper
    tree in the kernel's register layout)."""
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"pairwise_sum needs a power-of-two length, got {n}")
    while n > 1:
        n //= 2
        x = x[..., :n] + x[..., n:]
    return x[..., 0]


def _eden_factor(u: torch.Tensor, q: torch.Tensor, dim: int, squeeze=None) -> torch.Tensor:
    """|u|^2 / <u, q> over `dim` (pairwise order), 1 where <u, q> is not a normal positive number;
    `squeeze`: a size-1 dim to drop from the result."""
    num = pairwise_sum(u * u, dim)
    den = pairwise_sum(u * q, dim)
    if squeeze is not None:
        num, den = num.squeeze(squeeze), den.squeeze(squeeze)
    ok = den >= fmt.FP32_MIN_NORMAL
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.ones_like(den))


def _ms_eden_per128(z, stream, v, smax, ties, amax_reduce) -> NVFP4Tensor:
    _check_operand(z, OUTER_BLOCK, "MS-EDEN operand")
    rows, cols = z.shape
    z = z.float()
    poison = _poison_nonfinite(z)
    z = torch.where(torch.isfinite(z), z, torch.zeros((), device=z.device))
    amax = z.abs().amax()
    if amax_reduce is not None:
        amax = amax_reduce(amax)
    g, valid = _tensor_scale(amax, smax, v)
    zb = _blocks(z)                                               # [R, 1, C/16, 16]
    block_amax = _block_amax(zb)                                  # [R, C/16]
    s = fmt.round_to_e4m3(div_scalar(block_amax, v) / g).float()
    divisor = s * g
    keep = (s > 0) & (divisor >= fmt.FP32_MIN_NORMAL) & valid
    u = zb / _expand(torch.where(keep, divisor, torch.ones_like(divisor)))
    u = torch.where(_expand(keep), u, torch.zeros((), device=z.device))
    codes = encode_rn(u, ties)
    q = fmt.decode_e2m1(codes)
    # per-128 group = the 8 blocks of one rotated chunk
    ug = u.reshape(rows, cols // OUTER_BLOCK, OUTER_BLOCK)
    qg = q.reshape(rows, cols // OUTER_BLOCK, OUTER_BLOCK)
    factor = _eden_factor(ug, qg, dim=2).repeat_interleave(OUTER_BLOCK // BLOCK, dim=1)  # [R, C/16]
    corrected = s * factor
    clamped = (corrected > fmt.E4M3_MAX).sum()
    scales = fmt.stochastic_round_to_e4m3(corrected, _scale_uniforms(stream, rows, cols, z.device))
    scales = torch.where(keep, scales.float(), torch.zeros_like(s)).to(torch.float8_e4m3fn)
    return NVFP4Tensor(packed=_pack(codes, rows, cols), block_scales=scales, tensor_scale=g * poison,
                       flushed_blocks=((~keep) & (block_amax > 0)).sum(), clamped_scales=clamped)


def truncate_mantissa(x: torch.Tensor, mantissa_bits: int) -> torch.Tensor:
    """Truncate FP32 values toward zero to `mantissa_bits` explicit mantissa bits (8-bit exponent)."""
    drop = 23 - mantissa_bits
    bits = x.float().view(torch.int32)
    return (bits & ~((1 << drop) - 1)).view(torch.float32)


def _ms_eden_per16(z, stream, v, ties, amax_reduce) -> NVFP4Tensor:
    _check_operand(z, BLOCK, "MS-EDEN operand")
    rows, cols = z.shape
    z = z.float()
    poison = _poison_nonfinite(z)
    z = torch.where(torch.isfinite(z), z, torch.zeros((), device=z.device))
    zb = _blocks(z)
    block_amax = _block_amax(zb)
    m = truncate_mantissa(div_scalar(block_amax, v), 4)
    keep = m >= fmt.FP32_MIN_NORMAL
    u = zb / _expand(torch.where(keep, m, torch.ones_like(m)))
    u = torch.where(_expand(keep), u, torch.zeros((), device=z.device))
    codes = encode_rn(u, ties)
    factor = _eden_factor(u, fmt.decode_e2m1(codes), dim=3, squeeze=1)       # u: [R, 1, C/16, 16]
    r = (m * factor).to(torch.bfloat16).float()
    r = torch.where(keep, r, torch.zeros_like(r))
    r_max = r.amax()
    if amax_reduce is not None:
        r_max = amax_reduce(r_max)
    g, valid = _tensor_scale(r_max, 256.0, 1.0)
    t = r / g
    sr = fmt.stochastic_round_to_e4m3(t, _scale_uniforms(stream, rows, cols, z.device)).float()
    rn = fmt.round_to_e4m3(t).float()
    use_rn = (t < 2.0 ** -6) | (t > fmt.E4M3_MAX)
    scales = torch.where(use_rn, rn, sr)
    scales = torch.where(keep & valid, scales, torch.zeros_like(scales)).to(torch.float8_e4m3fn)
    return NVFP4Tensor(packed=_pack(codes, rows, cols), block_scales=scales, tensor_scale=g * poison,
                       flushed_blocks=((~keep) & (block_amax > 0)).sum(),
                       clamped_scales=(t > fmt.E4M3_MAX).sum())


# ---------------------------------------------------------------------------------------------
# TetraJet-v2 double-block quantizer (§3.4): 1x16 E4M3 inside 1x128 FP32, no tensor scale
# ---------------------------------------------------------------------------------------------

def quantize_double_block(
    x: torch.Tensor,
    *,
    mode: str = ROUND_NEAREST,
    ties: str = fmt.TIES_EVEN,
    stream: Optional[RandomStream] = None,
    sr_headroom: float = 1.0,
    outer_block: str | int = 128,
    amax_reduce: AmaxReduce = None,
) -> NVFP4Tensor:
    """QDB(x; mode). With sr_headroom h the block maximum targets v = 6/h (both scale levels).

    outer_block="tensor" replaces the per-128 FP32 scales by one per tensor (reference option; the
    result is still stored as [rows, cols/128] outer scales, all equal).
    """
    if outer_block not in (128, "128", "tensor"):
        raise ValueError(f"outer_block must be 128 or 'tensor', got {outer_block!r}")
    _check_operand(x, OUTER_BLOCK, "double-block operand")
    rows, cols = x.shape
    v = 6.0 / sr_headroom
    x = x.float()
    poison = _poison_nonfinite(x)
    x = torch.where(torch.isfinite(x), x, torch.zeros((), device=x.device))
    xo = x.reshape(rows, cols // OUTER_BLOCK, OUTER_BLOCK)
    if outer_block == "tensor":
        outer_amax = x.abs().amax()
        if amax_reduce is not None:
            outer_amax = amax_reduce(outer_amax)
        outer_amax = outer_amax.expand(rows, cols // OUTER_BLOCK)
    else:
        outer_amax = xo.abs().amax(dim=2)                           # [R, C/128]
    xb = _blocks(x)
    block_amax = _block_amax(xb)                                     # [R, C/16]
    per_block_outer = outer_amax.repeat_interleave(OUTER_BLOCK // BLOCK, dim=1)
    s_in, s_out_e, divisor, keep = double_block_scales(block_amax, per_block_outer, v)
    s_out = s_out_e[:, ::OUTER_BLOCK // BLOCK]
    # flushed blocks get codes 0 (§3.4)
    y = torch.where(_expand(keep), xb / _expand(divisor), torch.zeros((), device=x.device))
    codes = _encode(y.reshape(rows, cols), mode, ties, stream)
    return NVFP4Tensor(packed=fmt.pack_e2m1(codes), block_scales=s_in.to(torch.float8_e4m3fn), tensor_scale=None,
                       outer_scales=s_out.contiguous() * poison,
                       flushed_blocks=((~keep) & (block_amax > 0)).sum())


# ---------------------------------------------------------------------------------------------
# MXFP8 (§3.5): E4M3 elements, E8M0 scale per 1x32 block, RN only
# ---------------------------------------------------------------------------------------------

def quantize_mxfp8(x: torch.Tensor) -> MXFP8Tensor:
    _check_operand(x, fmt.MXFP8_BLOCK, "MXFP8 operand")
    rows, cols = x.shape
    x = x.float()
    xb = x.reshape(rows, cols // fmt.MXFP8_BLOCK, fmt.MXFP8_BLOCK)
    finite = torch.isfinite(xb)
    block_amax = torch.where(finite, xb.abs(), torch.zeros((), device=x.device)).amax(dim=2)
    k = fmt.e8m0_exponent(block_amax)
    scaled = torch.ldexp(xb, -k[..., None].to(torch.float32))
    # NaN stays NaN through the cast; +-Inf saturates in clamp, so mark it NaN explicitly
    scaled = torch.where(torch.isinf(xb), torch.full_like(scaled, float("nan")), scaled)
    data = fmt.round_to_e4m3(scaled).reshape(rows, cols)
    return MXFP8Tensor(data=data, scale_exponents=k)
