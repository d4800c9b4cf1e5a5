"""megatron_fp4.hadamard: randomized Hadamard transforms (numerics.md §4)."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_fp4.hadamard import hadamard_matrix, inverse_rht, rht
from megatron_fp4.quantizers import quantize_nvfp4
from megatron_fp4.rng import random_signs

F64 = torch.float64
U = 2.0 ** -24
SIZES = (16, 32, 128)


def sylvester_reference(n: int) -> torch.Tensor:
    """Natural-order Sylvester Hadamard matrix from its closed form H[i, j] = (-1)^popcount(i & j)."""
    i = torch.arange(n)
    parity = torch.zeros(n, n, dtype=torch.int64)
    anded = i[:, None] & i[None, :]
    for bit in range(int(math.log2(n))):
        parity ^= (anded >> bit) & 1
    return (1 - 2 * parity).to(F64) / math.sqrt(n)


def rht_reference(a: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """float64 (A * sigma) H_n per n-chunk, i.e. H_n (sigma * a) for every chunk a (H symmetric)."""
    n = signs.numel()
    h = sylvester_reference(n)
    chunks = a.to(F64).reshape(*a.shape[:-1], a.shape[-1] // n, n)
    return torch.einsum("...cj,jk->...ck", chunks * signs.to(F64), h).reshape(a.shape)


def _signs(n: int, key: int) -> torch.Tensor:
    return random_signs(key, n)


@pytest.mark.parametrize("n", SIZES)
def test_hadamard_matrix_matches_sylvester_and_is_orthonormal_symmetric(n):
    h = hadamard_matrix(n, F64)
    ref = sylvester_reference(n)
    assert torch.equal(h, ref)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=F64), atol=1e-14, rtol=0)
    assert torch.equal(h, h.T)
    h32 = hadamard_matrix(n)
    assert h32.dtype == torch.float32
    assert torch.equal(h32, ref.float())
    # entries are exactly +-1/sqrt(n) (rounded once)
    assert torch.equal(h32.abs(), torch.full((n, n), 1 / math.sqrt(n), dtype=F64).float())


def test_hadamard_rejects_non_power_of_two():
    with pytest.raises(ValueError):
        hadamard_matrix(24)


def _chunk_norm_bound(a: torch.Tensor, n: int) -> torch.Tensor:
    """Per-row rigorous float32 error scale of a rotation: gamma_n * sqrt(n) * ||a_row||."""
    return 1.01 * n * U * math.sqrt(n) * a.double().norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("n", SIZES)
def test_rht_matches_float64_definition(n):
    gen = torch.Generator().manual_seed(n)
    a = torch.randn(24, 4 * n, generator=gen) * torch.exp2(torch.randint(-8, 9, (24, 1), generator=gen).float())
    sigma = _signs(n, 1000 + n)
    out = rht(a, sigma)
    assert out.dtype == torch.float32 and out.shape == a.shape
    expected = rht_reference(a, sigma)
    assert ((out.double() - expected).abs() <= _chunk_norm_bound(a, n)).all()
    # signs on the input side: chunk-by-chunk H_n (sigma * a), the same sigma for every chunk
    chunk = a[:, n:2 * n]
    direct = (chunk.double() * sigma.double()) @ sylvester_reference(n)
    assert ((out[:, n:2 * n].double() - direct).abs() <= _chunk_norm_bound(chunk, n)).all()


def _round_f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).to(F64)


@pytest.mark.parametrize("n", SIZES)
def test_cpu_rotation_is_the_rounded_exact_sum_scaled_in_fp32(n):
    """On the CPU, rht = RN32(sum of +-sigma*a) * RN32(n^-1/2), bit for bit, whatever the BLAS: the
    reference forms the exact sum by the closed-form signs (every term a multiple of 2^-10 below 2^21:
    FP64 holds every partial sum exactly, while FP32 sums of such spread round), rounds it once, then
    applies the FP32 scaling as one FP32 product."""
    gen = torch.Generator().manual_seed(7 * n)
    a = (torch.randint(-1024, 1025, (40, 4 * n), generator=gen)
         * torch.exp2(torch.randint(-10, 11, (40, 4 * n), generator=gen).float())).float()
    a[0, :n] = 0.0                                   # an all-zero chunk: +0 everywhere
    a[1, :n] = -0.0
    sigma = _signs(n, 2000 + n)
    pm1 = sylvester_reference(n) * math.sqrt(n)      # exactly +-1
    chunks = a.to(F64).reshape(40, 4, n) * sigma.to(F64)
    exact = torch.zeros(40, 4, n, dtype=F64)
    for j in range(n):                               # left to right; every partial sum is exact
        exact = exact + chunks[:, :, j:j + 1] * pm1[j]
    scale = float(torch.tensor(1.0 / math.sqrt(n), dtype=torch.float32))
    expected = _round_f32(_round_f32(exact) * scale).reshape(40, 4 * n)
    out = rht(a, sigma)
    assert torch.equal(out.double(), expected)
    assert not torch.signbit(out[:2, :n]).any()


@pytest.mark.parametrize("n", SIZES)
def test_shared_sigma_cancels_in_the_product(n):
    gen = torch.Generator().manual_seed(7 * n)
    k = 2 * 128
    a = torch.randn(32, k, generator=gen)
    b = torch.randn(40, k, generator=gen) * 3.0
    sigma = _signs(n, 55 + n)
    prod = rht(a, sigma).double() @ rht(b, sigma).double().T
    exact = a.double() @ b.double().T
    # ||delta z|| <= gamma_n sqrt(n) ||a|| per operand; the float64 product adds nothing material
    bound = 2.05 * n * U * math.sqrt(n) * a.double().norm(dim=1)[:, None] * b.double().norm(dim=1)[None, :]
    assert ((prod - exact).abs() <= bound).all()
    # and the FP32 GEMM of the rotated operands is as accurate as an FP32 GEMM of the originals
    prod32 = (rht(a, sigma) @ rht(b, sigma).T).double()
    bound32 = bound + 1.01 * k * U * a.double().norm(dim=1)[:, None] * b.double().norm(dim=1)[None, :]
    assert ((prod32 - exact).abs() <= bound32).all()
    # a different sigma on one side does not cancel
    other = rht(a, sigma).double() @ rht(b, _signs(n, 9999)).double().T
    assert (other - exact).abs().max() > 1.0


@pytest.mark.parametrize("n", SIZES)
def test_inverse_rht_restores_the_input(n):
    gen = torch.Generator().manual_seed(3 * n)
    a = torch.randn(16, 3 * n, generator=gen) * 100.0
    sigma = _signs(n, 2 * n)
    restored = inverse_rht(rht(a, sigma), sigma)
    assert ((restored.double() - a.double()).abs() <= 2 * _chunk_norm_bound(a, n)).all()
    restored = rht(inverse_rht(a, sigma), sigma)
    assert ((restored.double() - a.double()).abs() <= 2 * _chunk_norm_bound(a, n)).all()


def test_rht_of_bf16_input_is_float32():
    a = torch.randn(4, 128).to(torch.bfloat16)
    sigma = _signs(128, 1)
    out = rht(a, sigma)
    assert out.dtype == torch.float32
    assert ((out.double() - rht_reference(a.double(), sigma)).abs() <= _chunk_norm_bound(a, 128)).all()


def test_rht_works_on_higher_rank_inputs():
    a = torch.randn(2, 3, 32)
    sigma = _signs(16, 4)
    out = rht(a, sigma)
    assert out.shape == a.shape
    assert torch.allclose(out, rht(a.reshape(6, 32), sigma).reshape(2, 3, 32))


@pytest.mark.parametrize("n,cols", [(16, 24), (16, 8), (32, 48), (128, 64), (128, 200)])
def test_non_multiple_dims_raise(n, cols):
    sigma = _signs(n, 0)
    with pytest.raises(ValueError, match=str(cols)):
        rht(torch.randn(4, cols), sigma)
    with pytest.raises(ValueError, match=str(cols)):
        inverse_rht(torch.randn(4, cols), sigma)


# ---------------------------------------------------------------------------------------------
# Sign side (§4 "Sign-side pitfall"): quantization error must depend on sigma
# ---------------------------------------------------------------------------------------------

def _structured_operand() -> torch.Tensor:
    """Rows with few large entries: their rotations, and so FP4 errors, depend strongly on sigma."""
    gen = torch.Generator().manual_seed(2)
    x = 0.01 * torch.randn(64, 256, generator=gen)
    x[:, 0] += 10.0
    x[:, 5] += -7.0
    x[:, 130] += 4.0
    x[::2, 64] += 3.0
    return x


def _rel_mse(z: torch.Tensor) -> float:
    z_hat = quantize_nvfp4(z).dequantize().double()
    return float(((z.double() - z_hat) ** 2).sum() / (z.double() ** 2).sum())


@pytest.mark.parametrize("n", (16, 128))
def test_quantization_error_depends_on_sigma(n):
    x = _structured_operand()
    errors = [_rel_mse(rht(x, _signs(n, key))) for key in range(8)]
    assert len(set(errors)) >= 6, errors
    assert max(errors) > 1.05 * min(errors), errors
    # and the rotated magnitudes themselves differ between sigmas
    assert not torch.equal(rht(x, _signs(n, 0)).abs(), rht(x, _signs(n, 1)).abs())


@pytest.mark.parametrize("n", (16, 128))
def test_signs_after_hadamard_lose_the_randomization(n):
    """Direct computation of the pitfall: sigma * (H a) has the magnitudes of the fixed H a for every
    sigma, so the quantizer (sign-symmetric) sees the same problem and the error is sigma-independent,
    although the product still cancels."""
    x = _structured_operand()
    h = hadamard_matrix(n)
    fixed = (x.reshape(64, -1, n) @ h)                        # H a per chunk, no signs
    wrong = [(fixed * _signs(n, key)).reshape(x.shape) for key in range(8)]
    for w in wrong[1:]:
        assert torch.equal(w.abs(), wrong[0].abs())
    errors = [_rel_mse(w) for w in wrong]
    assert len(set(errors)) == 1, errors
    assert errors[0] == _rel_mse(fixed.reshape(x.shape))
    # the wrong side still cancels in the GEMM, which is why the bug is silent
    b = torch.randn(8, x.shape[1], generator=torch.Generator().manual_seed(5))
    sigma = _signs(n, 3)
    wrong_b = ((b.reshape(8, -1, n) @ h) * sigma).reshape(b.shape)
    wrong_a = ((x.reshape(64, -1, n) @ h) * sigma).reshape(x.shape)
    assert torch.allclose(wrong_a.double() @ wrong_b.double().T, x.double() @ b.double().T,
                          rtol=1e-5, atol=1e-4)
    # while the library's (input-side) rotation does vary with sigma
    right = [_rel_mse(rht(x, _signs(n, key))) for key in range(8)]
    assert len(set(right)) > 1
