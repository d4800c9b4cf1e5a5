"""RHT-128 + MS-EDEN kernels vs quantizers.quantize_ms_eden(eden_group=128).

Given the same rotated values z, codes, E4M3 scales (scale SR draws the same counter-hash bits) and
the tensor scale are bit-exact. The rotation itself is an FP32 matmul in both twins and agrees to
FP32 rounding; `rht128()` exposes the kernel's own rotation so the quantization can be compared bit
for bit, and the rotation is compared with hadamard.rht to FP32 tolerance.
"""
import pytest
import torch
import triton
import triton.language as tl

from megatron_fp4 import quantizers as Q
from megatron_fp4.hadamard import rht
from megatron_fp4.rng import RandomStream, derive_key, random_signs
from megatron_fp4.kernels.eden import _pairwise_sum_128, rht128, rht_ms_eden

from kernel_test_util import assert_same_operand, cpu_interp, data, gpu, needs_cuda


def _sigma(seed, device="cpu"):
    return random_signs(derive_key(seed, 5), 128, device)


def _stream(seed, row_offset=0, col_offset=0):
    return RandomStream(derive_key(seed, 3), row_offset, col_offset)


def _check(a, sigma, stream, transpose=False, packed=None, ties="even", **cfg):
    got = rht_ms_eden(a, sigma, stream, transpose=transpose, packed=packed, ties=ties, **cfg)
    z = rht128(a, sigma, transpose=transpose, packed=packed, **cfg)
    assert_same_operand(got, Q.quantize_ms_eden(z, stream=stream, ties=ties))
    # the rotation agrees with the reference's FP32 matmul to FP32 rounding
    src = packed.dequantize_unscaled().t() if packed is not None else (a.t() if transpose else a)
    z_ref = rht(src, sigma)
    fin = torch.isfinite(z_ref)
    assert torch.equal(fin, torch.isfinite(z))
    err = ((z - z_ref)[fin].norm() / z_ref[fin].norm().clamp(min=1e-30)).item()
    assert err < 1e-6, err
    return got, z


@cpu_interp
@pytest.mark.parametrize("rows,cols,dtype", [(64, 256, torch.float32), (40, 128, torch.bfloat16)])
def test_eden_dense_bit_exact(rows, cols, dtype):
    a = data(rows, cols, seed=rows * 7 + cols, dtype=dtype)
    _check(a, _sigma(1), _stream(2, row_offset=5, col_offset=256))


@cpu_interp
def test_eden_dense_transposed_bit_exact():
    dy = data(256, 96, seed=4, dtype=torch.bfloat16)      # [T, N]; operand is dY^T [N, T], along T
    _check(dy, _sigma(3), _stream(4), transpose=True)


@cpu_interp
def test_eden_ties_away():
    a = data(32, 128, seed=9)
    _check(a, _sigma(5), _stream(6), ties="away")


@cpu_interp
def test_requant_from_packed_bit_exact():
    x = data(256, 64, seed=12)                              # X [T, K]
    xq = Q.quantize_nvfp4(x, smax=256.0, four_over_six=True)
    _check(None, _sigma(7), _stream(8, row_offset=64), packed=xq)


@cpu_interp
def test_eden_special_values():
    a = data(32, 128, seed=13)
    a[3, 7] = float("nan")
    got, _ = _check(a, _sigma(1), _stream(2))
    assert torch.isnan(got.tensor_scale)
    zeros = torch.zeros(16, 128)
    assert_same_operand(rht_ms_eden(zeros, _sigma(1), _stream(2)),
                        Q.quantize_ms_eden(zeros, stream=_stream(2)))


@gpu
@needs_cuda
@pytest.mark.parametrize("transpose", [False, True])
def test_eden_gpu_bit_exact(transpose):
    a = data(2048, 1024, seed=21, dtype=torch.bfloat16, device="cuda")
    _check(a, _sigma(1, "cuda"), _stream(2), transpose=transpose)


@gpu
@needs_cuda
def test_eden_gpu_fp32_source():
    a = data(512, 1024, seed=22, dtype=torch.float32, device="cuda")
    _check(a, _sigma(1, "cuda"), _stream(2))


@gpu
@needs_cuda
def test_requant_from_packed_gpu_bit_exact():
    x = data(1024, 512, seed=23, dtype=torch.bfloat16, device="cuda")
    xq = Q.quantize_nvfp4(x, smax=256.0, four_over_six=True)
    _check(None, _sigma(3, "cuda"), _stream(4), packed=xq)


@cpu_interp
def test_two_piece_counters_match_the_reference():
    # SwiGLU fc1 at TP > 1: the N dim is two pieces of the global one (rng.TwoPieces), along the
    # columns for E / W^T (dgrad) and along the rows for E^T (wgrad)
    from megatron_fp4.rng import TwoPieces
    pieces = TwoPieces(offset=128, split=128, offset_hi=384)
    dy = data(64, 256, seed=21, dtype=torch.bfloat16)       # [T, N]
    _check(dy, _sigma(9), _stream(10, col_offset=pieces))
    _check(data(128, 256, seed=22), _sigma(9), _stream(11, row_offset=pieces), transpose=True)
    got = rht_ms_eden(dy, _sigma(9), _stream(10, col_offset=pieces))
    plain = rht_ms_eden(dy, _sigma(9), _stream(10, col_offset=128))
    assert torch.equal(got.block_scales[:, :8].view(torch.uint8), plain.block_scales[:, :8].view(torch.uint8))
    assert not torch.equal(got.block_scales[:, 8:].view(torch.uint8), plain.block_scales[:, 8:].view(torch.uint8))


@cpu_interp
@pytest.mark.parametrize("source", ["dense", "transposed", "packed"])
def test_emitted_gemm_operand_is_the_exact_dequantized_operand(source):
    """emit_operand: the kernel also writes e2m1(q) * e4m3(s) in BF16 for the consuming GEMM; it must
    equal the returned operand's dequantize_unscaled() exactly (spread rows: flushed blocks and
    subnormal scales included), and the codes, scales and tensor scale must not change."""
    x = data(128, 256, seed=41)
    kw = dict(dense=dict(a=x), transposed=dict(a=x, transpose=True),
              packed=dict(packed=Q.quantize_nvfp4(x, smax=256.0, four_over_six=True)))[source]
    plain = rht_ms_eden(sigma=_sigma(41), stream=_stream(42), **kw)
    got = rht_ms_eden(sigma=_sigma(41), stream=_stream(42), emit_operand=True, **kw)
    assert plain.operand is None and got.operand.dtype == torch.bfloat16
    assert_same_operand(got, plain)
    assert torch.equal(got.operand.float(), got.dequantize_unscaled())
    assert (got.operand != 0).any()


@cpu_interp
@pytest.mark.parametrize("source", ["dense", "transposed", "packed"])
def test_block_amax_side_output_variant_is_bit_exact(source):
    """BAMAX: pass 1 stores each 16-block's amax of the rotation and pass 2 loads it (a compact layout
    for the per-block work, instead of reducing in the rotation's replicated layout); codes, scales,
    tensor scale and counters must equal the reference on the kernel's own rotation. Spread rows give
    flushed blocks; a NaN checks the sanitised amaxes."""
    x = data(128, 256, seed=51)
    x[7, 3] = float("nan") if source == "dense" else x[7, 3]
    kw = dict(dense=dict(a=x), transposed=dict(a=x, transpose=True),
              packed=dict(packed=Q.quantize_nvfp4(x, smax=256.0, four_over_six=True)))[source]
    got = rht_ms_eden(sigma=_sigma(51), stream=_stream(52), variant=dict(BAMAX=True), emit_operand=True, **kw)
    z = rht128(sigma=_sigma(51), **kw)
    assert_same_operand(got, Q.quantize_ms_eden(z, stream=_stream(52)))
    assert torch.equal(got.operand.float(), got.dequantize_unscaled())


@triton.jit
def _sum_rows_kernel(x_ptr, out_ptr, TREE: tl.constexpr):
    rows = tl.arange(0, 16)
    x = tl.load(x_ptr + rows[:, None, None] * 128 + tl.arange(0, 8)[None, :, None] * 16
                + tl.arange(0, 16)[None, None, :])
    if TREE:
        total = _pairwise_sum_128(x, 16)
    else:
        total = tl.sum(tl.reshape(x, (16, 128)), axis=1)
    tl.store(out_ptr + rows, total)


def _order_sensitive_rows(device):
    """16 rows of 128 FP32 values whose sum depends on the order: 1 and 2^-24s (each lost when added
    to 1 alone), wide-range Gaussians, and cancelling pairs."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(16, 128, generator=g) * torch.exp2(torch.randint(-20, 20, (16, 128), generator=g).float())
    x[0] = 2.0 ** -24
    x[0, 0] = 1.0
    x[1, ::2] = 3.0 + torch.rand(64, generator=g)
    x[1, 1::2] = -x[1, ::2] + 2.0 ** -20
    return x.to(device)


def _check_kernel_tree(device):
    x = _order_sensitive_rows(device)
    out = torch.empty(16, dtype=torch.float32, device=device)
    _sum_rows_kernel[(1,)](x, out, TREE=True)
    ref = Q.pairwise_sum(x, 1)
    assert torch.equal(out.view(torch.int32), ref.view(torch.int32)), (out - ref).abs().max()
    # the order matters for these rows: a left-to-right FP32 sum gives other bits for some
    sequential = x[:, 0].clone()
    for c in range(1, 128):
        sequential = sequential + x[:, c]
    assert not torch.equal(sequential, ref)


@cpu_interp
def test_kernel_sum_tree_is_the_twins_order():
    """The MS-EDEN kernel's EDEN-factor sums (_pairwise_sum_128) follow quantizers.pairwise_sum bit
    for bit on rows where the summation order changes the result (the end-to-end tests above rarely
    see a flipped scale at their sizes, so the order is checked here directly)."""
    _check_kernel_tree("cpu")


@gpu
@needs_cuda
def test_kernel_sum_tree_is_the_twins_order_gpu():
    _check_kernel_tree("cuda")
