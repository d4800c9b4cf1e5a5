"""Per-16 MS-EDEN kernel (kernels/eden16.py, `quartet2-kernel`'s backward) vs
quantizers.quantize_ms_eden(eden_group=16): given the kernel's own rotation (eden.rht128, the per-128
kernel's rotation code), codes, E4M3 scales (the scale SR draws the same counter-hash bits), the tensor
scale and the flushed / clamped counts are bit-exact; the codes and the BF16 r_b also against the
float64 oracle (tests/fp4_reference.py), which shares no code with the package."""
import pytest
import torch

from megatron_fp4 import quantizers as Q
from megatron_fp4.rng import RandomStream, derive_key, random_signs
from megatron_fp4.kernels.eden import rht128
from megatron_fp4.kernels.eden16 import rht_ms_eden16

import fp4_reference as ref
from kernel_test_util import assert_same_operand, cpu_interp, data, gpu, needs_cuda


def _sigma(seed, device="cpu"):
    return random_signs(derive_key(seed, 5), 128, device)


def _stream(seed, row_offset=0, col_offset=0):
    return RandomStream(derive_key(seed, 3), row_offset, col_offset)


def _check(a, sigma, stream, transpose=False, packed=None, ties="even"):
    got = rht_ms_eden16(a, sigma, stream, transpose=transpose, packed=packed, ties=ties)
    z = rht128(a, sigma, transpose=transpose, packed=packed)
    assert_same_operand(got, Q.quantize_ms_eden(z, stream=stream, eden_group=16, ties=ties))
    oracle = ref.ref_ms_eden_per16(z.cpu(), ties)
    assert torch.equal(ref.unpack_nibbles(got.packed.cpu()), oracle["codes"].to(torch.uint8).cpu())
    return got, z


@cpu_interp
@pytest.mark.parametrize("rows,cols,dtype", [(64, 256, torch.float32), (40, 128, torch.bfloat16)])
def test_eden16_dense_bit_exact(rows, cols, dtype):
    # rows spread over 2^-12..2^12: subnormal scales (the RN8 fallback below 2^-6) and flushed blocks
    a = data(rows, cols, seed=rows * 5 + cols, dtype=dtype)
    got, _ = _check(a, _sigma(1), _stream(2, row_offset=5, col_offset=256))
    s = got.block_scales.float()
    assert ((s > 0) & (s < 2.0 ** -6)).any() and (s >= 2.0 ** -6).any()


@cpu_interp
def test_eden16_transposed_and_ties_away():
    dy = data(256, 96, seed=4, dtype=torch.bfloat16)      # [T, N]; operand is dY^T [N, T], along T
    _check(dy, _sigma(3), _stream(4), transpose=True)
    _check(data(32, 128, seed=9), _sigma(5), _stream(6), ties="away")


@cpu_interp
def test_eden16_from_packed_bit_exact():
    x = data(256, 64, seed=12)                              # X [T, K]
    xq = Q.quantize_nvfp4(x, smax=256.0, four_over_six=True)
    _check(None, _sigma(7), _stream(8, row_offset=64), packed=xq)


@cpu_interp
def test_eden16_special_values_and_scale_sr():
    a = data(32, 128, seed=13)
    a[3, 7] = float("nan")
    got, _ = _check(a, _sigma(1), _stream(2))
    assert torch.isnan(got.tensor_scale)
    zeros = torch.zeros(16, 128)
    assert_same_operand(rht_ms_eden16(zeros, _sigma(1), _stream(2)),
                        Q.quantize_ms_eden(zeros, stream=_stream(2), eden_group=16))
    # another stream key draws other scale bits (the SR is live), the codes stay
    b = data(64, 256, seed=14, spread=False)
    one, other = rht_ms_eden16(b, _sigma(1), _stream(2)), rht_ms_eden16(b, _sigma(1), _stream(3))
    assert torch.equal(one.packed, other.packed)
    assert not torch.equal(one.block_scales.view(torch.uint8), other.block_scales.view(torch.uint8))


@cpu_interp
def test_eden16_amax_reduce_acts_on_max_r():
    a = data(32, 128, seed=15, spread=False)
    doubled = lambda t: t * 2                               # as if another TP rank held twice the max r
    got = rht_ms_eden16(a, _sigma(1), _stream(2), amax_reduce=doubled)
    z = rht128(a, _sigma(1))
    assert_same_operand(got, Q.quantize_ms_eden(z, stream=_stream(2), eden_group=16, amax_reduce=doubled))


def test_eden16_bad_arguments():
    with pytest.raises(ValueError, match="RandomStream"):
        rht_ms_eden16(torch.zeros(16, 128), _sigma(1), None)
    with pytest.raises(ValueError, match="multiple of 128"):
        rht_ms_eden16(torch.zeros(16, 96), _sigma(1), _stream(2))
    with pytest.raises(ValueError, match="rtn_ties"):
        rht_ms_eden16(torch.zeros(16, 128), _sigma(1), _stream(2), ties="up")


@gpu
@needs_cuda
@pytest.mark.parametrize("transpose", [False, True])
def test_eden16_gpu_bit_exact(transpose):
    a = data(2048, 1024, seed=21, dtype=torch.bfloat16, device="cuda")
    _check(a, _sigma(1, "cuda"), _stream(2), transpose=transpose)


@gpu
@needs_cuda
def test_eden16_from_packed_gpu_bit_exact():
    x = data(1024, 512, seed=23, dtype=torch.bfloat16, device="cuda")
    xq = Q.quantize_nvfp4(x, smax=256.0, four_over_six=True)
    _check(None, _sigma(3, "cuda"), _stream(4), packed=xq)


@cpu_interp
def test_eden16_two_piece_counters_match_the_reference():
    """SwiGLU fc1 at TP > 1: the rotated dim is two pieces of the global one (rng.TwoPieces); the scale
    SR's counters follow the pieces as the twin's do (columns for E, rows for E^T)."""
    from megatron_fp4.rng import TwoPieces
    pieces = TwoPieces(offset=128, split=128, offset_hi=384)
    dy = data(64, 256, seed=21, dtype=torch.bfloat16, spread=False)
    _check(dy, _sigma(9), _stream(10, col_offset=pieces))
    _check(data(128, 256, seed=22, spread=False), _sigma(9), _stream(11, row_offset=pieces), transpose=True)
    got = rht_ms_eden16(dy, _sigma(9), _stream(10, col_offset=pieces))
    plain = rht_ms_eden16(dy, _sigma(9), _stream(10, col_offset=128))
    assert torch.equal(got.block_scales[:, :8].view(torch.uint8), plain.block_scales[:, :8].view(torch.uint8))
    assert not torch.equal(got.block_scales[:, 8:].view(torch.uint8), plain.block_scales[:, 8:].view(torch.uint8))
