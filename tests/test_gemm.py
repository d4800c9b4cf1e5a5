"""megatron_fp4.gemm: exact emulation of block-scaled GEMMs (numerics.md §1.4, §7.1-§7.3).

The reference is a float64 GEMM of the exactly dequantized operands, rebuilt in the test from the raw
codes and scales (tests/fp4_reference.py), never from the library's dequantize(). Error bounds
(u = 2^-24, the FP32 unit roundoff):

- every e2m1*e4m3 operand value has <= 6 significant bits, so each product a_i*b_i (<= 12 bits) is
  exact in FP32; the only FP32 error is the summation of K terms in any order,
  |err| <= gamma_K * sum_i |a_i b_i| with gamma_K = K u / (1 - K u), plus 2 roundings for the FP32
  scale product g_a * g_b and the final scaling: |err| <= (K + 2) u (1 + 1e-3) * sum_i |a_i b_i| * g_a g_b.
- double-block "exact": per 128-slab FP32 sums (gamma_128), one scaling by s_out_a * s_out_b (2 roundings)
  and K/128 - 1 slab additions: (128 + 2 + K/128) u (1 + 1e-3) * sum_i |x_i y_i|.
- double-block "fp32": each operand value q*s_in*s_out is rounded once to FP32 (<= u relative), so a
  product is off by <= 2u + u^2 relative, then gamma_K: (K + 3) u (1 + 1e-3) * sum_i |x_i y_i|.
- double-block "bf16": each operand value rounded to BF16 (<= 2^-8 relative, 8 significant bits; the
  spec's "2^-9" is the typical, not the worst, per-element error), products off by
  <= 2 * 2^-8 + 2^-16 relative, then FP32 summation: (2^-7 + 2^-16) sum|x_i y_i| + FP32 term.
"""
from __future__ import annotations

import pytest
import torch

from megatron_fp4 import gemm
from megatron_fp4 import quantizers as Q
from megatron_fp4.hadamard import rht
from megatron_fp4.rng import RandomStream, derive_key, random_signs

import fp4_reference as ref
from fp4_reference import gaussian

F64 = torch.float64
U = 2.0 ** -24



def unscaled64(qt) -> torch.Tensor:
    """Exact float64 e2m1 * e4m3 per element from the packed codes and block scales."""
    s = qt.block_scales.double().repeat_interleave(16, dim=1)
    if qt.block_rows > 1:
        s = s.repeat_interleave(qt.block_rows, dim=0)
    return ref.decode_codes(ref.unpack_nibbles(qt.packed)) * s


def outer64(qt) -> torch.Tensor:
    return qt.outer_scales.double().repeat_interleave(128, dim=1)


def _check_within(out, exact, bound):
    assert out.dtype == torch.float32
    err = (out.double() - exact).abs()
    assert (err <= bound).all(), float((err / bound.clamp(min=1e-300)).max())


# ---------------------------------------------------------------------------------------------
# §7.1 per-tensor-scaled operands
# ---------------------------------------------------------------------------------------------

PER_TENSOR_PAIRS = {
    "rn-rn": (lambda a: Q.quantize_nvfp4(a), lambda b: Q.quantize_nvfp4(b)),
    "46-16x16": (lambda a: Q.quantize_nvfp4(a, four_over_six=True, smax=256.0),
                 lambda b: Q.quantize_nvfp4(b, block_rows=16, four_over_six=True, smax=256.0)),
    "sr-sr": (lambda a: Q.quantize_nvfp4(a, mode="sr", v=6 * 16 / 17, stream=RandomStream(1)),
              lambda b: Q.quantize_nvfp4(b, mode="sr", v=6 * 16 / 17, stream=RandomStream(2))),
    "eden-eden": (lambda a: Q.quantize_ms_eden(a, stream=RandomStream(3)),
                  lambda b: Q.quantize_ms_eden(b, stream=RandomStream(4), eden_group=16)),
}


@pytest.mark.parametrize("pair", list(PER_TENSOR_PAIRS))
@pytest.mark.parametrize("k,scale_a,scale_b", [(256, 1.0, 1.0), (512, 1e-12, 3e9), (1024, 2.0 ** 40, 2.0 ** -60)])
def test_per_tensor_matmul_matches_float64(pair, k, scale_a, scale_b):
    qa, qb = PER_TENSOR_PAIRS[pair]
    a = gaussian(48, k, seed=k, scale=scale_a, spread=3)
    b = gaussian(32, k, seed=k + 1, scale=scale_b, spread=3)
    if pair == "eden-eden":
        sigma = random_signs(derive_key(k), 128)
        a, b = rht(a, sigma), rht(b, sigma)
    ta, tb = qa(a), qb(b)
    out = gemm.matmul(ta, tb)
    assert out.shape == (48, 32)
    ga, gb = float(ta.tensor_scale), float(tb.tensor_scale)
    a64, b64 = unscaled64(ta), unscaled64(tb)
    exact = (a64 @ b64.T) * ga * gb
    abs_sum = (a64.abs() @ b64.abs().T) * ga * gb
    _check_within(out, exact, (k + 2) * U * (1 + 1e-3) * abs_sum)
    # the operands fed to the GEMM are exact in BF16 (§1.4)
    assert torch.equal(a64.to(torch.bfloat16).double(), a64)
    # all three emulation modes are the same computation for per-tensor operands
    for mode in ("fp32", "bf16"):
        assert torch.equal(gemm.matmul(ta, tb, mode=mode), out)


def test_per_tensor_matmul_is_exact_when_fp32_sums_are_exact():
    """Every block holds a 6, so every block scale is 448 and every operand value is a multiple of
    224: products are multiples of 2^10 and |partial sums| <= 64 * 2688^2 < 2^34, so every FP32
    partial sum is exact, in any order, and the result equals float64 up to the final scaling."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-6, 7, (16, 64), generator=gen).float()
    b = torch.randint(-6, 7, (8, 64), generator=gen).float()
    a[:, ::16], b[:, ::16] = 6.0, -6.0          # amax 6: g = 6 / 2688 for both, s_b = 448
    ta, tb = Q.quantize_nvfp4(a), Q.quantize_nvfp4(b)
    out = gemm.matmul(ta, tb)
    ga, gb = float(ta.tensor_scale), float(tb.tensor_scale)
    assert (ta.block_scales.float() == 448).all() and (tb.block_scales.float() == 448).all()
    p = unscaled64(ta) @ unscaled64(tb).T
    assert torch.equal(out.double(), ref.f32(ref.f32(torch.tensor(ga * gb, dtype=F64)) * p))


def test_tensor_scale_is_applied_to_the_output_not_folded_into_bf16_operands():
    """With g not a power of two, folding g into BF16 operands would add ~2^-9 relative error per
    element (§7.1); the emulated product must instead be within FP32 accumulation error."""
    a = gaussian(64, 256, seed=5) * 0.7731
    b = gaussian(64, 256, seed=6) * 1.3117
    ta, tb = Q.quantize_nvfp4(a), Q.quantize_nvfp4(b)
    out = gemm.matmul(ta, tb).double()
    ga, gb = float(ta.tensor_scale), float(tb.tensor_scale)
    a64, b64 = unscaled64(ta) * ga, unscaled64(tb) * gb
    exact = a64 @ b64.T
    folded = a64.to(torch.bfloat16).double() @ b64.to(torch.bfloat16).double().T
    err_lib = float((out - exact).abs().max())
    err_folded = float((folded - exact).abs().max())
    assert err_lib * 50 < err_folded


def test_nan_tensor_scale_propagates_through_matmul():
    a = gaussian(16, 64, seed=7)
    a[3, 3] = float("nan")
    out = gemm.matmul(Q.quantize_nvfp4(a), Q.quantize_nvfp4(gaussian(8, 64, seed=8)))
    assert out.isnan().all()


# ---------------------------------------------------------------------------------------------
# §7.2 double-block operands
# ---------------------------------------------------------------------------------------------

def _double_block_pair(k, seed, mode="rn"):
    a = gaussian(40, k, seed=seed, spread=4)
    b = gaussian(24, k, seed=seed + 1, scale=1e-3, spread=4)
    a[:, 128:256] *= 1e4                                  # slabs of very different magnitude
    if mode == "rn":
        return Q.quantize_double_block(a), Q.quantize_double_block(b)
    return (Q.quantize_double_block(a, mode="sr", stream=RandomStream(derive_key(seed, 1))),
            Q.quantize_double_block(b, mode="sr", stream=RandomStream(derive_key(seed, 2))))


def _double_block_exact(ta, tb):
    x64 = unscaled64(ta) * outer64(ta)                  # q * s_in * s_out, exact in float64
    y64 = unscaled64(tb) * outer64(tb)
    return x64, y64, x64 @ y64.T, x64.abs() @ y64.abs().T


@pytest.mark.parametrize("k", [128, 512])
@pytest.mark.parametrize("mode", ["rn", "sr"])
def test_double_block_exact_mode(k, mode):
    ta, tb = _double_block_pair(k, seed=k, mode=mode)
    out = gemm.matmul(ta, tb, mode="exact")
    _, _, exact, abs_sum = _double_block_exact(ta, tb)
    _check_within(out, exact, (128 + 2 + k // 128) * U * (1 + 1e-3) * abs_sum)


@pytest.mark.parametrize("k", [128, 512])
def test_double_block_fp32_mode(k):
    ta, tb = _double_block_pair(k, seed=10 + k)
    out = gemm.matmul(ta, tb, mode="fp32")
    _, _, exact, abs_sum = _double_block_exact(ta, tb)
    _check_within(out, exact, (k + 3) * U * (1 + 1e-3) * abs_sum)


@pytest.mark.parametrize("k", [128, 512])
def test_double_block_bf16_mode(k):
    ta, tb = _double_block_pair(k, seed=20 + k)
    out = gemm.matmul(ta, tb, mode="bf16")
    x64, y64, exact, abs_sum = _double_block_exact(ta, tb)
    # worst-case bound (see module docstring)
    _check_within(out, exact, (2.0 ** -7 + 2.0 ** -16) * abs_sum + (k + 1) * U * 1.01 * abs_sum)
    # the brief's per-product-sum bound 2^-8 also holds on this data (errors do not all align)
    _check_within(out, exact, 2.0 ** -8 * abs_sum + (k + 1) * U * 1.01 * abs_sum)
    # and it is exactly the FP32 GEMM of the BF16-rounded operands (x_hat formed in FP32, then BF16)
    xb = ref.bf16(ref.f32(x64))
    yb = ref.bf16(ref.f32(y64))
    _check_within(out, xb @ yb.T, (k + 1) * U * 1.01 * (xb.abs() @ yb.abs().T))
    # and it is not secretly exact: the BF16 rounding is visible
    exact_mode = gemm.matmul(ta, tb, mode="exact").double()
    assert (out.double() - exact_mode).abs().max() > 0


def test_double_block_rejects_unknown_mode():
    ta, tb = _double_block_pair(128, seed=1)
    with pytest.raises(ValueError):
        gemm.matmul(ta, tb, mode="tf32")


def test_mixing_double_block_and_per_tensor_raises():
    a = gaussian(16, 256, seed=2)
    b = gaussian(8, 256, seed=3)
    with pytest.raises(ValueError):
        gemm.matmul(Q.quantize_double_block(a), Q.quantize_nvfp4(b))
    with pytest.raises(ValueError):
        gemm.matmul(Q.quantize_nvfp4(a), Q.quantize_double_block(b))


def test_inner_dim_mismatch_raises():
    with pytest.raises(ValueError):
        gemm.matmul(Q.quantize_nvfp4(gaussian(16, 256, 4)), Q.quantize_nvfp4(gaussian(16, 128, 5)))
    with pytest.raises(ValueError):
        gemm.matmul(Q.quantize_double_block(gaussian(16, 256, 4)), Q.quantize_double_block(gaussian(16, 384, 5)))
    with pytest.raises(ValueError):
        gemm.matmul_mxfp8(Q.quantize_mxfp8(gaussian(16, 64, 4)), Q.quantize_mxfp8(gaussian(16, 96, 5)))


# ---------------------------------------------------------------------------------------------
# §7.3 MXFP8
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k,scale_a,scale_b", [(64, 1.0, 1.0), (256, 1e-15, 1e12), (512, 3.0, 1e-3)])
def test_mxfp8_matmul_matches_float64(k, scale_a, scale_b):
    a = gaussian(32, k, seed=k, scale=scale_a, spread=6)
    b = gaussian(16, k, seed=k + 3, scale=scale_b, spread=6)
    ma, mb = Q.quantize_mxfp8(a), Q.quantize_mxfp8(b)
    out = gemm.matmul_mxfp8(ma, mb)
    a64 = ma.data.double() * torch.exp2(ma.scale_exponents.double()).repeat_interleave(32, dim=1)
    b64 = mb.data.double() * torch.exp2(mb.scale_exponents.double()).repeat_interleave(32, dim=1)
    assert torch.equal(a64.to(torch.bfloat16).double(), a64), "MXFP8 operands are exact in BF16"
    # products of two E4M3 values (<= 4 significant bits each) times powers of two are exact in FP32
    _check_within(out, a64 @ b64.T, (k + 1) * U * (1 + 1e-3) * (a64.abs() @ b64.abs().T))
