"""Shared Triton device helpers: the counter hash, E4M3 rounding/encoding and E2M1 rounding.

Each helper is the twin of a torch function in megatron_fp4 (rng.hash_counter, format.round_to_e4m3,
format.e4m3_neighbours, format.round_to_e2m1_code) and is written so that the interpreter and the GPU
give the same bits:
- E4M3 rounding is done in FP32 with exact power-of-two scalings and the 2^23 magic-number RNE,
  and the E4M3 byte is assembled with integer ops (the interpreter's fp32->float8 cast is wrong for
  ~2% of values, and a hardware cast would not saturate the way we need);
- true divisions use tl.math.div_rn (plain `/` may compile to an approximate division on GPU);
- callers launch with enable_fp_fusion=False so no mul+add is contracted into an FMA that torch
  (which runs each op separately) would not use.
"""
from __future__ import annotations

import collections
import functools
import os

import numpy as np
import torch
import triton
import triton.language as tl

from megatron_fp4.rng import KEY_IV as _KEY_IV

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

FP32_MIN_NORMAL = tl.constexpr(2.0 ** -126)  # constexpr: jit code may only read constexpr globals


@triton.jit
def tensor_scale(amax_bits_ptr, nonfinite_ptr, gout_ptr, SMAX_V, write):
    """quantizers._tensor_scale: g = amax / fp32(Smax*v) (IEEE), g = 1 where g < 2^-126.

    Every program recomputes g from the amax word (cheaper than a separate launch); the program
    with `write` set stores g, multiplied by NaN when the operand held a non-finite value.
    """
    amax = tl.load(amax_bits_ptr).to(tl.float32, bitcast=True)
    g = tl.math.div_rn(amax, SMAX_V)
    valid = g >= FP32_MIN_NORMAL
    g = tl.where(valid, g, 1.0)
    # returned as 1.0/0.0: the interpreter mis-types a broadcast scalar int1 (bitwise_and fails)
    valid = tl.where(valid, 1.0, 0.0)
    poison = tl.where(tl.load(nonfinite_ptr) != 0, float("nan"), 1.0)
    tl.store(gout_ptr, g * poison, mask=write)
    return g, valid


@triton.jit
def div_scalar(a, v, inv_v, SCALAR_RECIP: tl.constexpr):
    # The reference divides by a scalar with IEEE division on every device (quantizers.div_scalar),
    # so the kernels use SCALAR_RECIP=False; the reciprocal form mirrors torch's CUDA
    # `tensor / python_float` (a * fp32(1/fp32(v))) and is kept only for comparisons.
    if SCALAR_RECIP:
        return a * inv_v
    else:
        return tl.math.div_rn(a, v)


@triton.jit
def div_prep(d):
    """Per-divisor setup for exact_div (d: FP32 normal, 2^-126 <= d < 2^127; flushed blocks pass 1.0).

    Returns (dn, p, r): d = dn / p with dn in [1, 2) and p a power of two (both exact), and
    r = RN(1/dn). Normalising the divisor keeps every intermediate of the FMA correction in the
    normal range, so no residual underflows (Markstein's conditions).
    """
    bits = d.to(tl.uint32, bitcast=True)
    e_field = (bits >> 23) & 0xFF
    dn = ((bits & 0x807FFFFF) | (127 << 23)).to(tl.float32, bitcast=True)
    p = ((254 - e_field) << 23).to(tl.float32, bitcast=True)      # 2^(127 - e): x*p/dn == x/d
    r = tl.math.div_rn(tl.full(dn.shape, 1.0, tl.float32), dn)
    return dn, p, r


@triton.jit
def exact_div(x, dn, p, r, INTERP: tl.constexpr):
    """IEEE quotient RN(x / d) for d = dn / p from div_prep, without a per-element division.

    xs = x*p is exact whenever the quotient is normal (|x/d| >= 2^-126); q = RN(xs*r) is within one
    ulp, the residual xs - q*dn is exact in one FMA, and RN(q + res*r) is the correctly rounded
    quotient (Markstein's theorem; r = RN(1/dn), dn in [1, 2)). Checked on an H100 against torch's
    IEEE x / d: 0 differing of 1.07e9 pairs with 2^-100 <= |x/d| <= 2^20 (random, bf16 / (e4m3 * g),
    and 2.7e8 within 3 ulp of the E2M1 midpoints; benchmarks/bench_variants.py). Below 2^-100 the
    residual drops under 2^-126 and Triton's FP32 code flushes it (FTZ; its div_rn flushes too): such
    quotients round to code 0, square to 0 in FP32 (EDEN sums) and enter both 4/6 SSEs identically,
    so no code, scale or decision can see them.
    The interpreter's fma rounds twice (x*y + z in numpy), so it divides directly.
    """
    if INTERP:
        return tl.math.div_rn(x, dn / p)
    else:
        xs = x * p
        q = xs * r
        res = tl.math.fma(-q, dn, xs)
        return tl.math.fma(res, r, q)


@triton.jit
def _mix32(x):
    # lowbias32 (rng.mix32) on uint32: multiplies wrap mod 2^32 exactly as the torch twin masks them
    x = x ^ (x >> 16)
    x = x * tl.full([], 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], 0x846CA68B, tl.uint32)
    x = x ^ (x >> 16)
    return x


@triton.jit
def hash_uniform(key, hi, lo):
    """rng.hash_counter(key, hi, lo) -> rng.uniform_from_bits: float32 in [0, 1), multiples of 2^-24.

    key: int32 holding the 32-bit key's bit pattern; hi, lo: uint32 tensors (global row / column).
    """
    k = key.to(tl.uint32, bitcast=True)
    h = _mix32(hi ^ k)
    h = _mix32(h ^ lo)
    h = _mix32(h + tl.full([], 0x9E3779B9, tl.uint32))
    # one int-to-float conversion: a bit-assembled exact form (mantissa trick, +1/2 for the top bit)
    # took 3 more instructions per element in sass_stats, more than the conversion pipe costs here
    return (h >> 8).to(tl.float32) * (2.0 ** -24)


KEY_IV = tl.constexpr(_KEY_IV)   # rng.derive_key's initial value


@triton.jit
def _fold(k, lo, hi):
    # rng.fold on uint32: the field's low half, then its high half
    k = _mix32((k ^ lo) + tl.full([], 0x9E3779B9, tl.uint32))
    return _mix32(k ^ hi)


@triton.jit
def stream_key(key, state_ptr, role, NSTATE: tl.constexpr, NROLE: tl.constexpr):
    """rng.RandomStream.effective_key in-kernel, as the int32 bit pattern hash_uniform takes: `key`
    itself without a state (NSTATE == 0), else K = derive_key(key, *state[:NSTATE]) and, with NROLE,
    derive_key(K, role). state_ptr: the stream's int64 device state (read at launch time, so a replayed
    CUDA graph reads what was written there before the replay); unused (any pointer) when NSTATE == 0."""
    k = key.to(tl.uint32, bitcast=True)
    if NSTATE > 0:
        zero = tl.full([], 0, tl.uint32)
        iv = tl.full([], KEY_IV, tl.uint32)
        k = _fold(iv, k, zero)
        for i in tl.static_range(NSTATE):
            f = tl.load(state_ptr + i).to(tl.int64)
            k = _fold(k, (f & 0xFFFFFFFF).to(tl.uint32), ((f >> 32) & 0xFFFFFFFF).to(tl.uint32))
        if NROLE:
            k = _fold(_fold(iv, k, zero), role.to(tl.uint32, bitcast=True), zero)
    return k.to(tl.int32, bitcast=True)


def stream_args(stream, dummy: torch.Tensor) -> tuple:
    """(key, state pointer, role) and dict(NSTATE, NROLE) for a kernel taking stream_key's arguments;
    `dummy` stands in for the state pointer of a stream without one (or no stream)."""
    if stream is None:
        return (0, dummy, 0), dict(NSTATE=0, NROLE=0)
    key, state, role, nstate, nrole = stream.kernel_key()
    if state is not None and state.device != dummy.device:
        raise ValueError(f"the random stream's state is on {state.device}, the operand on {dummy.device}")
    return (key, dummy if state is None else state, role), dict(NSTATE=nstate, NROLE=nrole)


@triton.jit
def dot_pm1(a, h, SPLIT: tl.constexpr, INTERP: tl.constexpr):
    """a @ h with FP32 sums and every product exact, for a +-1 matrix h (the signed Hadamard, BF16 on
    the GPU): a BF16 source is one tensor-core dot (SPLIT=1); an FP32 source is split into three BF16
    parts hi + mid + lo == a exactly and dotted three times into one FP32 accumulator (SPLIT=3).
    The interpreter reads BF16 dot operands as integers, and its FP32 dot is numpy's BLAS, whose
    summation order depends on the CPU (OpenBLAS picks a different sgemm kernel on AVX2 and AVX-512
    machines). So there it sums in FP64 and rounds once to FP32, as hadamard.rht does on the CPU:
    the FP64 sum of n FP32 terms is exact (any order gives it) when the terms' magnitudes lie within
    2^(29 - log2 n) of the largest, so both give the correctly rounded FP32 sum whatever the BLAS (and +0 for a zero sum)."""
    if INTERP:
        acc = tl.dot(a.to(tl.float64), h.to(tl.float64)).to(tl.float32) + 0.0   # a zero sum: +0
    elif SPLIT == 1:
        acc = tl.dot(a.to(tl.bfloat16), h)
    else:
        af = a.to(tl.float32)
        hi = af.to(tl.bfloat16)
        r1 = af - hi.to(tl.float32)
        mid = r1.to(tl.bfloat16)
        lo = (r1 - mid.to(tl.float32)).to(tl.bfloat16)
        acc = tl.dot(hi, h)
        acc = tl.dot(mid, h, acc)
        acc = tl.dot(lo, h, acc)
    return acc


@triton.jit
def counter(local, off, split, off_hi):
    """Global random-counter coordinate (uint32) of local indices: rng.global_index with
    (off, split, off_hi) from RandomStream.kernel_offsets (off_hi already has the split subtracted)."""
    return tl.where(local < split, local + off, local + off_hi).to(tl.uint32)


@triton.jit
def rn_e4m3(t):
    """format.round_to_e4m3 for t >= 0 (NaN-free): RNE to the E4M3 grid, saturating at 448, as FP32.

    The quantum of t's binade is 2^(e-3) (normals) or 2^-9 (subnormals, t < 2^-6): scale t so that
    the quantum is 1 (exact, a power of two), round to an integer by adding and removing 2^23, scale
    back. A carry into the next binade comes out right automatically.
    """
    t = tl.minimum(t, 448.0)
    e_field = (t.to(tl.uint32, bitcast=True) >> 23) & 0xFF
    q_field = tl.maximum(e_field, 127 - 6) - 3          # exponent field of the quantum
    quantum = (q_field << 23).to(tl.float32, bitcast=True)
    inv_quantum = ((254 - q_field) << 23).to(tl.float32, bitcast=True)
    n = (t * inv_quantum + 8388608.0) - 8388608.0       # RNE to an integer (t*inv < 2^5)
    return n * quantum


@triton.jit
def e4m3_bits(r):
    """uint8 E4M3 pattern of an exactly representable r in [0, 448] (integer assembly, no cast)."""
    b = r.to(tl.uint32, bitcast=True)
    e_field = (b >> 23) & 0xFF
    normal_bits = ((e_field - 120) << 3) | ((b >> 20) & 7)   # E4M3 bias 7 vs FP32 bias 127
    sub_bits = (r * 512.0).to(tl.uint32)                     # m * 2^-9, m = 0..7
    return tl.where(r >= 2.0 ** -6, normal_bits, sub_bits).to(tl.uint8)


@triton.jit
def e4m3_value(bits):
    """FP32 value of E4M3 patterns 0..0x7E (positive, finite), exact."""
    bits = bits.to(tl.uint32)
    e = bits >> 3
    m = bits & 7
    normal = ((e + 120) << 23 | (m << 20)).to(tl.float32, bitcast=True)
    sub = m.to(tl.float32) * (2.0 ** -9)
    return tl.where(e > 0, normal, sub)


@triton.jit
def sr_e4m3(t, uniform):
    """format.stochastic_round_to_e4m3 for t >= 0: returns the chosen E4M3 pattern (uint8).

    Neighbours lo <= t <= hi are +-1 on the pattern of the nearest value (format.e4m3_neighbours);
    hi with probability (t - lo)/(hi - lo), the difference t - lo being exact (Sterbenz).
    """
    t = tl.minimum(tl.maximum(t, 0.0), 448.0)
    nearest = rn_e4m3(t)
    bits = e4m3_bits(nearest).to(tl.int32)
    above = nearest > t
    lo_bits = tl.where(above, bits - 1, bits)
    hi_bits = tl.where(above, bits, tl.minimum(bits + 1, 0x7E))
    lo = e4m3_value(lo_bits)
    hi = e4m3_value(hi_bits)
    gap = hi - lo
    prob_up = tl.where(gap > 0, tl.math.div_rn(t - lo, tl.where(gap > 0, gap, 1.0)), 0.0)
    return tl.where(uniform < prob_up, hi_bits, lo_bits).to(tl.uint8)


@triton.jit
def rn_e2m1_code(y, TIES_AWAY: tl.constexpr):
    """quantizers.encode_rn: signed 4-bit code (uint8) of y rounded to the E2M1 grid, saturating.

    code(|y|) = number of midpoints below |y|; at a tie the value rounds up when the lower code is
    odd (ties to even) or always (ties away), exactly as format.round_to_e2m1_code compares.
    """
    m = tl.abs(y)
    if TIES_AWAY:
        c = ((m >= 0.25).to(tl.uint8) + (m >= 0.75).to(tl.uint8) + (m >= 1.25).to(tl.uint8)
             + (m >= 1.75).to(tl.uint8) + (m >= 2.5).to(tl.uint8) + (m >= 3.5).to(tl.uint8)
             + (m >= 5.0).to(tl.uint8))
    else:
        c = ((m > 0.25).to(tl.uint8) + (m >= 0.75).to(tl.uint8) + (m > 1.25).to(tl.uint8)
             + (m >= 1.75).to(tl.uint8) + (m > 2.5).to(tl.uint8) + (m >= 3.5).to(tl.uint8)
             + (m > 5.0).to(tl.uint8))
    return c | ((y < 0).to(tl.uint8) << 3)


@triton.jit
def rn_e2m1(y, TIES_AWAY: tl.constexpr, CODE_FROM_SUM: tl.constexpr = True):
    """(signed code uint8, signed grid value FP32) of y rounded to E2M1, saturating at 6.

    Ties to even use FP32's own RNE: with c = 2^22 * 2^k, k = floor(log2(max(|y|, 1))) (a power of
    two, from the exponent bits), the ulp of |y| + c is the E2M1 spacing of |y|'s binade (0.5 below 2,
    1 in [2, 4), 2 above), and at a tie the even neighbour of the sum is the even E2M1 code, so
    (|y| + c) - c is |y| rounded to the grid (Sterbenz: the subtraction is exact). c must be that
    power of two, not max(|y|, 1) * 2^22: for |y| just below 2 or 4 the latter puts the sum in the
    next binade of c (ulp twice the spacing), e.g. 4 - 2^-22 came out as 3 and 2 - 2^-23 as 1.5.

    CODE_FROM_SUM: the code is read off the sum's bits, code = bits(|y| + c) - bits(c) + 2k (the
    number of spacings above c, plus the codes below the binade: 0, 2, 4), clamped at 7 — integer ops
    only, where the older form (False, kept for benchmarks/bench_variants.py) decoded the rounded
    value with a compare, a shift and a float-to-int conversion (a quarter-rate instruction on
    Hopper). |y| is clamped at 8 first so that k <= 3 (everything above 7 saturates to code 7).
    The sign comes from y < 0 (not the sign bit) so that -0 gets code 0, as the reference's.
    Ties away keep the midpoint compares (rn_e2m1_code). Identical to rn_e2m1_code either way.
    """
    if TIES_AWAY:
        code = rn_e2m1_code(y, True)
        val = e2m1_value(code)
    else:
        m = tl.minimum(tl.abs(y), 8.0)
        e_field = tl.maximum(m, 1.0).to(tl.uint32, bitcast=True) >> 23        # 127 + k
        c_bits = (e_field + 22) << 23
        c = c_bits.to(tl.float32, bitcast=True)
        total = m + c
        neg = y < 0
        r = tl.minimum(total - c, 6.0)
        if CODE_FROM_SUM:
            steps = total.to(tl.int32, bitcast=True) - c_bits.to(tl.int32, bitcast=True)
            mag = tl.minimum(steps + (e_field.to(tl.int32) * 2 - 254), 7).to(tl.uint32)
        else:
            bits = r.to(tl.uint32, bitcast=True)
            # 1.0 -> 254-252 = 2; below 1, r is 0 or 0.5 (code 0 or 1): a compare, not a conversion
            mag = tl.where(r >= 1.0, (bits >> 22) - 252, (r > 0.0).to(tl.uint32))
        code = (mag | (neg.to(tl.uint32) << 3)).to(tl.uint8)
        val = tl.where(neg, -r, r)
    return code, val


@triton.jit
def sr_e2m1(y, uniform):
    """quantizers.encode_sr: |y| (clipped at 6) rounds up to the next grid value with probability
    (|y| - lo) / (hi - lo); the gap is a power of two, so multiplying by its inverse is the same
    exact quotient the reference divides out."""
    m = tl.minimum(tl.abs(y), 6.0)
    # lo from the bits: at and above 1 the grid keeps one mantissa bit in every binade, so masking the
    # rest floors m to it; below 1 it is 0.5 or 0. The spacing above lo is 2^(e-1) in binade 2^e.
    mb = m.to(tl.uint32, bitcast=True)
    e_field = mb >> 23
    big = m >= 1.0
    half = (m >= 0.5).to(tl.uint32)
    lo = tl.where(big, mb & 0xFFC00000, half * 0x3F000000).to(tl.float32, bitcast=True)
    lo_code = tl.where(big, (mb >> 22) - 252, half)
    inv_gap = tl.where(big, (255 - e_field) << 23, 0x40000000).to(tl.float32, bitcast=True)
    prob_up = tl.where(lo_code < 7, (m - lo) * inv_gap, 0.0)
    code = (lo_code + (uniform < prob_up).to(tl.uint32)).to(tl.uint8)
    return code | ((y < 0).to(tl.uint8) << 3)


@triton.jit
def e2m1_value(code):
    """FP32 value of signed 4-bit codes (format.decode_e2m1), without a table or a conversion: for a
    magnitude code c = 2e + m (e: 2 exponent bits, m: 1 mantissa bit) the value 2^(e-1) (1 + m/2)
    has the FP32 bits (c + 252) << 22; c = 1 (0.5) is (c + 251) << 22 and c = 0 is 0. The sign bit
    is bit 3 of the code. Integer ops only (the conversion of the older form was quarter-rate)."""
    c = (code & 7).to(tl.uint32)
    bits = tl.where(c == 0, 0, (c + tl.where(c == 1, 251, 252)) << 22)
    bits = bits | ((code.to(tl.uint32) & 8) << 28)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def halve(x, ROWS: tl.constexpr, N: tl.constexpr):
    """One step of quantizers.pairwise_sum's halving tree: [ROWS, N] -> [ROWS, N // 2] holding
    x[:, c] + x[:, c + N // 2] ([ROWS] when N == 2). One IEEE add of two operands per element, which
    no reduction order or compiler can change (callers run with FP contraction off), so a sum built
    from these steps has the twin's bits on every device, unlike tl.sum's compiler-chosen order."""
    if N == 2:
        a, b = tl.split(x)
    else:
        a, b = tl.split(tl.permute(tl.reshape(x, (ROWS, 2, N // 2)), (0, 2, 1)))
    return a + b


@triton.jit
def unpack_codes(byte, ROWS: tl.constexpr, COLS: tl.constexpr):
    """[ROWS, COLS/2] packed bytes -> [ROWS, COLS] codes, element 2i from the low nibble (format.unpack_e2m1)."""
    return tl.reshape(tl.join(byte & 15, byte >> 4), (ROWS, COLS))


@triton.jit
def block_values(codes, scale_bytes, ROWS: tl.constexpr, COLS: tl.constexpr):
    """FP32 [ROWS, COLS] = e2m1(codes) * e4m3(scale) with one E4M3 scale byte per 16 consecutive
    elements along COLS (scale_bytes [ROWS, COLS/16]): NVFP4Tensor.dequantize_unscaled of a tile."""
    vals = tl.reshape(e2m1_value(codes), (ROWS, COLS // 16, 16)) * e4m3_value(scale_bytes)[:, :, None]
    return tl.reshape(vals, (ROWS, COLS))


@triton.jit
def pack_codes(codes, BR: tl.constexpr, BC: tl.constexpr):
    """[BR, BC] uint8 codes -> [BR, BC/2] bytes, element 2i in the low nibble (format.pack_e2m1)."""
    even, odd = tl.split(tl.reshape(codes, (BR, BC // 2, 2)))
    return even | (odd << 4)


def fp32_reciprocal(v: float) -> float:
    """fp32(1 / fp32(v)), the reciprocal ATen's CUDA division by a Python scalar multiplies with."""
    return float(np.float32(1.0) / np.float32(v))


def signed_key(key: int) -> int:
    """A 32-bit key as the int32 with the same bit pattern (kernel arguments are typed by value)."""
    key &= 0xFFFFFFFF
    return key - (1 << 32) if key >= (1 << 31) else key


@triton.jit(do_not_specialize=["role"])
def _signs_kernel(out_ptr, N, key, state_ptr, role, NSTATE: tl.constexpr, NROLE: tl.constexpr,
                  BLOCK: tl.constexpr):
    # rng.random_signs: -1 where bit 31 of H(key, 0, i) is set, i.e. where its uniform is >= 1/2
    k = stream_key(key, state_ptr, role, NSTATE, NROLE)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    u = hash_uniform(k, tl.zeros([BLOCK], tl.uint32), i.to(tl.uint32))
    tl.store(out_ptr + i, tl.where(u >= 0.5, -1.0, 1.0), mask=i < N)


def random_signs(stream, n: int, device) -> torch.Tensor:
    """rng.random_signs(stream, n) in one launch on `device` (a RandomStream; its state, if any, is
    read on the device): graph-capturable, and one launch instead of the twin's ~35 (more with a
    state to fold)."""
    out = torch.empty(n, dtype=torch.float32, device=device)
    args, meta = stream_args(stream, out)
    block = min(1024, triton.next_power_of_2(max(n, 16)))
    _signs_kernel[(triton.cdiv(n, block),)](out, n, *args, BLOCK=block, **meta)
    return out


_SIGNED_HADAMARD_CACHE: "collections.OrderedDict" = collections.OrderedDict()


@functools.lru_cache(maxsize=None)
def _hadamard_pm1(n: int, device: str) -> torch.Tensor:
    # hadamard.hadamard_pm1 on the device, made once per size and device: a host-to-device copy
    # at every call would make the host wait for the GPU
    from megatron_fp4.hadamard import hadamard_pm1
    return hadamard_pm1(n).to(device=device, dtype=torch.float32)


def signed_hadamard(sigma: torch.Tensor, device, n: int) -> torch.Tensor:
    """diag(sigma) H+-1 [n, n] as the kernels' dot operand, (a*sigma) @ H == a @ (diag(sigma) H):
    BF16 on GPU (exact: entries are +-1), FP32 under the interpreter.

    Built once per sigma tensor (identity and version, so an in-place change rebuilds it) and device:
    a backward call rotates several operands with the same signs, and each build is three launches.
    The entry holds sigma itself, so its id cannot be reused while the entry lives."""
    if sigma.numel() != n:
        raise ValueError(f"the kernel rotates in {n}-chunks, got {sigma.numel()} signs")
    device = torch.device(device)
    cache_key = (id(sigma), sigma._version, str(device), INTERPRET)
    entry = _SIGNED_HADAMARD_CACHE.get(cache_key)
    if entry is not None and entry[0] is sigma:
        _SIGNED_HADAMARD_CACHE.move_to_end(cache_key)
        return entry[1]
    hs = sigma.reshape(-1).to(device=device, dtype=torch.float32)[:, None] * _hadamard_pm1(n, str(device))
    hs = hs.contiguous() if INTERPRET else hs.to(torch.bfloat16).contiguous()
    _SIGNED_HADAMARD_CACHE[cache_key] = (sigma, hs)
    while len(_SIGNED_HADAMARD_CACHE) > 16:
        _SIGNED_HADAMARD_CACHE.popitem(last=False)
    return hs
