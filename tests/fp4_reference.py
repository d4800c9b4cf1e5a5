"""Independent float64 brute-force references for the numerics tests (numerics.md §1-§5, §7).

Nothing in this module imports megatron_fp4. The value grids are built from the format definitions
(bit fields), rounding is a brute-force nearest-value search over the whole grid, and every FP32
operation of the spec's pseudocode is emulated as the float64 operation followed by one rounding to
float32. That is exact: for +, -, *, / of two float32 operands, rounding the float64 result to float32
gives the correctly rounded float32 result (53 >= 2 * 24 + 2, so double rounding is innocuous).
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch

F64 = torch.float64
FP32_MIN_NORMAL = 2.0 ** -126

# ---------------------------------------------------------------------------------------------
# Grids from the bit-field definitions
# ---------------------------------------------------------------------------------------------


def e2m1_from_code(code: int) -> float:
    """E2M1: bit 3 sign, bits 2-1 exponent (bias 1), bit 0 mantissa; exponent 0 is subnormal."""
    sign = -1.0 if code & 0b1000 else 1.0
    exp = (code >> 1) & 0b11
    man = code & 1
    if exp == 0:
        return sign * man * 0.5
    return sign * (1.0 + man / 2.0) * 2.0 ** (exp - 1)


def e4m3_from_bits(bits: int) -> float:
    """E4M3 "fn": bit 7 sign, bits 6-3 exponent (bias 7), bits 2-0 mantissa; S.1111.111 is NaN."""
    sign = -1.0 if bits & 0x80 else 1.0
    exp = (bits >> 3) & 0xF
    man = bits & 0x7
    if exp == 0xF and man == 0x7:
        return math.nan
    if exp == 0:
        return sign * man * 2.0 ** -9
    return sign * (1.0 + man / 8.0) * 2.0 ** (exp - 7)


E2M1_POS = torch.tensor([e2m1_from_code(c) for c in range(8)], dtype=F64)           # index = code
E4M3_POS = torch.tensor([e4m3_from_bits(b) for b in range(0x7F)], dtype=F64)        # index = bits
E4M3_MAX = float(E4M3_POS[-1])


def f32(t: torch.Tensor) -> torch.Tensor:
    """Round float64 values to the nearest float32 (RNE) and return them as float64."""
    return t.to(torch.float32).to(F64)


def bf16(t: torch.Tensor) -> torch.Tensor:
    """Round float64 values to the nearest bfloat16 (via float32: exact enough, see callers)."""
    return t.to(torch.float32).to(torch.bfloat16).to(F64)


# ---------------------------------------------------------------------------------------------
# Brute-force nearest-grid rounding
# ---------------------------------------------------------------------------------------------


def nearest_index(mag: torch.Tensor, grid: torch.Tensor, ties: str) -> torch.Tensor:
    """Index of the grid value nearest to each non-negative `mag` (float64), by full search.

    Saturation is implicit: beyond the largest grid value the nearest one is the largest.
    ties="even": at an exact tie pick the even index (= even mantissa bit for E2M1 codes and E4M3
    bit patterns); ties="away": pick the larger value.
    """
    # beyond 2x the largest value the nearest is the largest; clamping keeps the float64 distances
    # of huge inputs distinguishable (no false ties)
    flat = mag.reshape(-1).to(F64).clamp(max=2 * float(grid[-1]))
    out = torch.empty(flat.shape, dtype=torch.int64)
    idx = torch.arange(grid.numel())
    for start in range(0, flat.numel(), 4096):
        m = flat[start:start + 4096]
        dist = (m[:, None] - grid[None, :]).abs()
        best = dist == dist.min(dim=1, keepdim=True).values
        if ties == "even":
            # prefer even indices among the (at most two, adjacent) nearest
            score = best.to(torch.int64) * (2 + (idx % 2 == 0).to(torch.int64))[None, :]
        elif ties == "away":
            score = best.to(torch.int64) * (1 + idx)[None, :]
        else:
            raise ValueError(ties)
        out[start:start + 4096] = score.argmax(dim=1)
    return out.reshape(mag.shape)


def rn4_codes(y: torch.Tensor, ties: str = "even") -> torch.Tensor:
    """Signed 4-bit E2M1 codes of y (float64) rounded to nearest, saturating at 6; sign of y kept."""
    mag_code = nearest_index(y.abs(), E2M1_POS, ties)
    return (mag_code | ((y < 0).to(torch.int64) << 3)).to(torch.uint8)


def rn8(t: torch.Tensor) -> torch.Tensor:
    """RN8 of float64 values: nearest E4M3 value, ties to even bit pattern, saturating at +-448."""
    mag = E4M3_POS[nearest_index(t.abs(), E4M3_POS, "even")]
    return torch.where(t < 0, -mag, mag)


def e4m3_bracket(t: torch.Tensor):
    """Adjacent E4M3 values lo <= t <= hi for 0 <= t <= 448 (float64), by search; lo == hi only at 448.

    When t is itself on the grid, lo = t and hi is the next value up (and hi = lo = 448 at the top).
    """
    t = t.to(F64)
    le = (E4M3_POS[None, :] <= t.reshape(-1, 1))
    lo_idx = le.to(torch.int64).sum(dim=1) - 1
    hi_idx = (lo_idx + 1).clamp(max=E4M3_POS.numel() - 1)
    return E4M3_POS[lo_idx].reshape(t.shape), E4M3_POS[hi_idx].reshape(t.shape)


def e2m1_bracket(mag: torch.Tensor):
    """Adjacent E2M1 magnitudes lo <= mag <= hi for 0 <= mag <= 6 (float64)."""
    le = (E2M1_POS[None, :] <= mag.reshape(-1, 1).to(F64))
    lo_idx = le.to(torch.int64).sum(dim=1) - 1
    hi_idx = (lo_idx + 1).clamp(max=7)
    return lo_idx.reshape(mag.shape), hi_idx.reshape(mag.shape)


def decode_codes(codes: torch.Tensor) -> torch.Tensor:
    """Float64 values of 4-bit codes (any integer dtype)."""
    table = torch.tensor([e2m1_from_code(c) for c in range(16)], dtype=F64)
    return table[codes.to(torch.int64)]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Codes from bytes: element 2i is the low nibble, 2i+1 the high nibble."""
    p = packed.to(torch.int64)
    out = torch.empty(*p.shape[:-1], p.shape[-1] * 2, dtype=torch.int64)
    out[..., 0::2] = p % 16
    out[..., 1::2] = p // 16
    return out.to(torch.uint8)


def e8m0_exponent_exact(amax: float) -> int:
    """Smallest integer k with 448 * 2^k >= amax (exact rational arithmetic), 0 for amax == 0,
    clamped to [-127, 127]."""
    if amax == 0:
        return 0
    a = Fraction(amax)
    k = math.floor(math.log2(amax)) - 9          # a lower estimate; walk up exactly
    while Fraction(448) * Fraction(2) ** k < a:
        k += 1
    while Fraction(448) * Fraction(2) ** (k - 1) >= a:
        k -= 1
    return max(-127, min(127, k))


# ---------------------------------------------------------------------------------------------
# The spec's quantizers, written from the pseudocode
# ---------------------------------------------------------------------------------------------


def _blocks(x: torch.Tensor, block_rows: int = 1, width: int = 16) -> torch.Tensor:
    r, c = x.shape
    return x.reshape(r // block_rows, block_rows, c // width, width)


def ref_q16(x: torch.Tensor, v: float = 6.0, smax: float = 448.0, ties: str = "even",
            block_rows: int = 1, target: float | None = None):
    """§3.1 Q16 with RN4: returns dict(codes [R,C] uint8, scales [R/br, C/16] f64, g f64, y [R,C]).

    g = amax / (Smax * v); the block scales map the block max to `target` (default v): 4/6 uses
    target 4 with the tensor scale of v = 6.
    """
    target = v if target is None else target
    x = x.to(torch.float32).to(F64)
    rows, cols = x.shape
    amax = x.abs().max()
    if amax == 0:
        return dict(codes=torch.zeros(rows, cols, dtype=torch.uint8),
                    scales=torch.zeros(rows // block_rows, cols // 16, dtype=F64), g=1.0,
                    y=torch.zeros(rows, cols, dtype=F64))
    v32 = float(f32(torch.tensor(target, dtype=F64)))
    g = float(f32(amax / f32(torch.tensor(smax * v, dtype=F64))))
    assert g >= FP32_MIN_NORMAL, "reference: pick test data whose tensor scale is normal"
    xb = _blocks(x, block_rows)
    amax_b = xb.abs().amax(dim=(1, 3))
    s = rn8(f32(f32(amax_b / v32) / g))
    d = f32(s * g)
    keep = (s > 0) & (d >= FP32_MIN_NORMAL)
    y = f32(xb / torch.where(keep, d, torch.ones_like(d))[:, None, :, None])
    y = torch.where(keep[:, None, :, None], y, torch.zeros_like(y))
    codes = rn4_codes(y, ties)
    return dict(codes=codes.reshape(rows, cols), scales=torch.where(keep, s, torch.zeros_like(s)),
                g=g, y=y.reshape(rows, cols))


def dequant_per_tensor(codes, scales, g, block_rows=1):
    """Exact float64 x_hat = e2m1 * e4m3 * g (at most 30 significant bits: exact in float64)."""
    s = scales.repeat_interleave(16, dim=1)
    if block_rows > 1:
        s = s.repeat_interleave(block_rows, dim=0)
    return decode_codes(codes) * s * g


def ref_q16_four_over_six(x: torch.Tensor, ties: str = "even", block_rows: int = 1,
                          smax: float = 256.0, near_tie_rtol: float = 1e-4):
    """§3.2: candidates max->6 and max->4 with RN4, keep the lower SSE (float64), ties to max->6.

    Returns the chosen reference plus `ambiguous` [R/br, C/16]: blocks whose two SSEs agree to
    `near_tie_rtol` without the candidates being identical, where an FP32 SSE evaluation may
    legitimately choose either candidate; and `exact_tie`: blocks both candidates represent by the
    same values (they must go to max->6).
    """
    r6 = ref_q16(x, 6.0, smax, ties, block_rows)
    r4 = ref_q16(x, 6.0, smax, ties, block_rows, target=4.0)
    x64 = x.to(torch.float32).to(F64)
    rows, cols = x.shape
    sse, deq = [], []
    for r in (r6, r4):
        deq.append(dequant_per_tensor(r["codes"], r["scales"], r6["g"], block_rows))
        sse.append(_blocks((x64 - deq[-1]) ** 2, block_rows).sum(dim=(1, 3)))
    use4 = sse[1] < sse[0]
    # candidates representing the block by the same values are an exact tie (-> max->6); otherwise
    # SSEs this close may be ordered either way by an FP32 evaluation
    same_values = (_blocks(deq[0], block_rows) == _blocks(deq[1], block_rows)).all(dim=3).all(dim=1)
    ambiguous = ((sse[1] - sse[0]).abs() <= near_tie_rtol * (sse[0] + sse[1])) & ~same_values
    codes = torch.where(use4[:, None, :, None], _blocks(r4["codes"], block_rows),
                        _blocks(r6["codes"], block_rows)).reshape(rows, cols)
    scales = torch.where(use4, r4["scales"], r6["scales"])
    return dict(codes=codes, scales=scales, g=r6["g"], ambiguous=ambiguous, exact_tie=same_values,
                r6=r6, r4=r4)


def ref_qdb(x: torch.Tensor, ties: str = "even", v: float = 6.0, tensor_outer: bool = False):
    """§3.4 QDB with RN4: dict(codes, s_in [R, C/16], s_out [R, C/128], y).

    tensor_outer: the reference option outer_block="tensor" (one FP32 outer scale for the tensor).
    """
    x = x.to(torch.float32).to(F64)
    rows, cols = x.shape
    v32 = float(f32(torch.tensor(v, dtype=F64)))
    xo = x.reshape(rows, cols // 128, 128)
    big_a = xo.abs().amax(dim=2)
    if tensor_outer:
        big_a = torch.full_like(big_a, float(x.abs().max()))
    s_out = f32(big_a / f32(torch.tensor(448.0 * v, dtype=F64)))
    s_out = torch.where(big_a > 0, s_out, torch.ones_like(s_out))
    s_out_e = s_out.repeat_interleave(8, dim=1)
    xb = _blocks(x)
    amax_b = xb.abs().amax(dim=(1, 3))
    t = f32(f32(amax_b / s_out_e) / v32)
    t = torch.where(t == 0, torch.full_like(t, 2.0 ** -9), t)
    s_in = rn8(t.clamp(max=448.0))
    d = f32(s_in * s_out_e)
    keep = (s_in > 0) & (d >= FP32_MIN_NORMAL)
    y = f32(xb / torch.where(keep, d, torch.ones_like(d))[:, None, :, None])
    y = torch.where(keep[:, None, :, None], y, torch.zeros_like(y))
    return dict(codes=rn4_codes(y, ties).reshape(rows, cols),
                s_in=torch.where(keep, s_in, torch.zeros_like(s_in)), s_out=s_out,
                y=y.reshape(rows, cols))


EDEN_V = 6.0 / 0.988125          # §5.1: v = 6 / ((17/16) * 0.93)
EDEN_SMAX = 255.99


def ref_ms_eden_per128(z: torch.Tensor, ties: str = "even"):
    """§5.2 steps 2-5: dict(codes, s (RN8 scales), g, u, S_G per block, t (= s * S_G), keep)."""
    z = z.to(torch.float32).to(F64)
    rows, cols = z.shape
    v32 = float(f32(torch.tensor(EDEN_V, dtype=F64)))
    amax = z.abs().max()
    g = float(f32(amax / f32(torch.tensor(EDEN_SMAX * EDEN_V, dtype=F64))))
    zb = _blocks(z)
    amax_b = zb.abs().amax(dim=(1, 3))
    s = rn8(f32(f32(amax_b / v32) / g))
    d = f32(s * g)
    keep = (s > 0) & (d >= FP32_MIN_NORMAL)
    u = f32(zb / torch.where(keep, d, torch.ones_like(d))[:, None, :, None])
    u = torch.where(keep[:, None, :, None], u, torch.zeros_like(u))
    codes = rn4_codes(u, ties)
    q = decode_codes(codes)
    ug = u.reshape(rows, cols // 128, 128)
    qg = q.reshape(rows, cols // 128, 128)
    num, den = (ug * ug).sum(dim=2), (ug * qg).sum(dim=2)
    big_s = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)),
                        torch.ones_like(den)).repeat_interleave(8, dim=1)
    return dict(codes=codes.reshape(rows, cols), s=s, g=g, u=u.reshape(rows, cols), S=big_s,
                t=s * big_s, keep=keep)


def truncate_to_4_mantissa_bits(x: torch.Tensor) -> torch.Tensor:
    """Truncate positive float64 values toward zero to 1 + 4 significant bits."""
    m, e = torch.frexp(x)                            # x = m * 2^e, m in [0.5, 1)
    return torch.ldexp(torch.floor(m * 32.0) / 32.0, e)


def ref_ms_eden_per16(z: torch.Tensor, ties: str = "even", rel: float = 1e-5):
    """§5.3 steps 1-3. Returns codes (against m_b), m, and r bounds: r_lo/r_hi are the BF16 roundings
    of m*S*(1 -+ rel), covering an FP32 (rather than float64) evaluation of S_b."""
    z = z.to(torch.float32).to(F64)
    rows, cols = z.shape
    v32 = float(f32(torch.tensor(EDEN_V, dtype=F64)))
    zb = _blocks(z)
    amax_b = zb.abs().amax(dim=(1, 3))
    m = truncate_to_4_mantissa_bits(f32(amax_b / v32))
    keep = m >= FP32_MIN_NORMAL
    u = f32(zb / torch.where(keep, m, torch.ones_like(m))[:, None, :, None])
    u = torch.where(keep[:, None, :, None], u, torch.zeros_like(u))
    codes = rn4_codes(u, ties)
    q = decode_codes(codes)
    num, den = (u * u).sum(dim=(1, 3)), (u * q).sum(dim=(1, 3))
    big_s = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)),
                        torch.ones_like(den))
    r = m * big_s
    zero = torch.zeros_like(r)
    return dict(codes=codes.reshape(rows, cols), m=m, keep=keep, u=u.reshape(rows, cols),
                r_lo=torch.where(keep, bf16(r * (1 - rel)), zero),
                r_hi=torch.where(keep, bf16(r * (1 + rel)), zero))


# -- test data ---------------------------------------------------------------------------------

def gaussian(rows, cols, seed, scale=1.0, spread=0):
    """N(0,1) * scale; spread > 0 multiplies each 16-block by 2^U{-spread..spread}."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen, dtype=F64)
    if spread:
        e = torch.randint(-spread, spread + 1, (rows, cols // 16), generator=gen).to(F64)
        x = x * torch.exp2(e).repeat_interleave(16, dim=1)
    return (x * scale).float()
