"""NVFP4 and MXFP8 number formats: E2M1 elements, E4M3 block scales, E8M0 scales.

Everything here is elementwise and deterministic. Rounding of elements to the E2M1 grid is done by
comparing magnitudes against the midpoints of the grid (no float tricks), so that ties are handled
exactly as the spec's tie table says (numerics.md §2.1).
"""
from __future__ import annotations

import functools

import torch

# Positive E2M1 magnitudes by code 0..7; codes 8..15 carry the sign in bit 3.
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
# Midpoints between neighbouring grid values: code(|y|) = number of midpoints |y| lies above.
E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)

E4M3_MAX = 448.0
E4M3_MIN_SUBNORMAL = 2.0 ** -9
FP32_MIN_NORMAL = 2.0 ** -126

TIES_EVEN = "even"
TIES_AWAY = "away"


@functools.lru_cache(maxsize=256)
def _cached_constant(value, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(value, dtype=dtype, device=device)


def device_constant(value, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """A read-only tensor holding `value` (a number or a tuple) on `device`, made once per (value,
    dtype, device). Why: `torch.tensor(v, device="cuda")` copies from pageable host memory, which
    makes the host wait for the GPU at every call; the quantizers' hot paths must not synchronize.
    Callers never write into the result."""
    return _cached_constant(value, dtype, torch.device(device if device is not None else "cpu"))


def e2m1_values(device=None) -> torch.Tensor:
    """All 16 code values (index = code), code 8 being -0."""
    pos = device_constant(E2M1_GRID, device=device)
    return torch.cat([pos, -pos])


def round_to_e2m1_code(mag: torch.Tensor, ties: str = TIES_EVEN) -> torch.Tensor:
    """Magnitude code 0..7 of the nearest E2M1 value to |y| (saturating at 6).

    Ties to even: at the midpoint above an odd code the value rounds up, otherwise down; ties away:
    every midpoint rounds up. Comparisons are exact, so the rule holds bit for bit.
    """
    if ties not in (TIES_EVEN, TIES_AWAY):
        raise ValueError(f"rtn_ties must be 'even' or 'away', got {ties!r}")
    code = torch.zeros(mag.shape, dtype=torch.uint8, device=mag.device)
    for lower_code, mid in enumerate(E2M1_MIDPOINTS):
        rounds_up_at_tie = ties == TIES_AWAY or lower_code % 2 == 1
        code += (mag >= mid) if rounds_up_at_tie else (mag > mid)
    return code


def e2m1_lower_code(mag: torch.Tensor) -> torch.Tensor:
    """Largest code whose value is <= |y| (|y| clamped to [0, 6])."""
    code = torch.zeros(mag.shape, dtype=torch.uint8, device=mag.device)
    for grid_value in E2M1_GRID[1:]:
        code += mag >= grid_value
    return code


def code_to_magnitude(code: torch.Tensor) -> torch.Tensor:
    """Float32 magnitude of magnitude codes 0..7."""
    table = device_constant(E2M1_GRID, device=code.device)
    return table[code.long()]


def signed_codes(mag_code: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Combine a magnitude code and a sign into a 4-bit E2M1 code (sign in bit 3)."""
    return mag_code | (negative.to(torch.uint8) << 3)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Float32 values of 4-bit codes 0..15."""
    return e2m1_values(codes.device)[codes.long()]


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes two per byte along the last dim: element 2i low nibble, 2i+1 high nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number of codes along the last dim ({codes.shape[-1]})")
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_e2m1."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


# ---------------------------------------------------------------------------------------------
# E4M3 block scales
# ---------------------------------------------------------------------------------------------

def round_to_e4m3(t: torch.Tensor) -> torch.Tensor:
    """RN8: round to E4M3 (ties to even) with saturation at +-448, returned as float8_e4m3fn.

    torch's cast rounds correctly but does not saturate (|x| > 464 becomes NaN), so clamp first.
    """
    return t.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def e4m3_neighbours(t: torch.Tensor):
    """For t >= 0 (clamped to <= 448): adjacent E4M3 values lo <= t <= hi, as float32.

    Positive E4M3 values are ordered like their bit patterns, so the neighbours of the nearest value
    are +-1 on its uint8 pattern (also across the subnormal/normal boundary). 0 has no predecessor
    and 448 no successor.
    """
    t = t.float().clamp(0.0, E4M3_MAX)
    nearest = t.to(torch.float8_e4m3fn)
    bits = nearest.view(torch.uint8).to(torch.int16)
    nearest_f = nearest.float()
    above = nearest_f > t
    lo_bits = torch.where(above, bits - 1, bits)
    hi_bits = torch.where(above, bits, (bits + 1).clamp(max=0x7E))  # 0x7E = 448
    lo = lo_bits.to(torch.uint8).view(torch.float8_e4m3fn).float()
    hi = hi_bits.to(torch.uint8).view(torch.float8_e4m3fn).float()
    return lo, hi


def stochastic_round_to_e4m3(t: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """SR8 (numerics.md §2.4): hi with probability (t - lo)/(hi - lo), else lo. t >= 0, clamped <= 448."""
    t = t.float().clamp(0.0, E4M3_MAX)
    lo, hi = e4m3_neighbours(t)
    gap = hi - lo
    prob_up = torch.where(gap > 0, (t - lo) / torch.where(gap > 0, gap, torch.ones_like(gap)),
                          torch.zeros_like(t))
    return torch.where(uniform < prob_up, hi, lo).to(torch.float8_e4m3fn)


# ---------------------------------------------------------------------------------------------
# MXFP8: E4M3 elements with one E8M0 (power-of-two) scale per 32 elements
# ---------------------------------------------------------------------------------------------

MXFP8_BLOCK = 32


def e8m0_exponent(amax: torch.Tensor) -> torch.Tensor:
    """Exponent k of the MXFP8 scale 2^ceil(log2(amax / 448)), exact; 0 where amax == 0.

    Computed without any rounded division: with amax = m * 2^e (frexp, m in [0.5, 1)) and
    448 = 0.875 * 2^9, the smallest k with 448 * 2^k >= amax is e - 9 when m <= 0.875, else e - 8.
    Clamped to [-127, 127].
    """
    mantissa, exponent = torch.frexp(amax.float())
    k = torch.where(mantissa <= 0.875, exponent - 9, exponent - 8)
    k = torch.where(amax == 0, torch.zeros_like(k), k)
    return k.clamp(-127, 127).to(torch.int32)
