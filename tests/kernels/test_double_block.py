"""Double-block (TetraJet-v2) kernel vs quantizers.quantize_double_block: codes, E4M3 inner scales
and FP32 outer scales bit for bit, RN and SR (the counter hash draws the same uniforms), with and
without sr_headroom, transposed sources, RHT-16 fused in front (compared on the kernel's own rotation,
which agrees with hadamard.rht to FP32 summation order), special values, and the dispatch."""
import pytest
import torch

from megatron_fp4 import quantizers as Q
from megatron_fp4.hadamard import rht
from megatron_fp4.rng import RandomStream, derive_key, random_signs
from megatron_fp4.kernels import dispatch as D
from megatron_fp4.kernels.double_block import quantize_double_block as qdb_kernel, rht16

from kernel_test_util import cpu_interp, data, gpu, needs_cuda


def assert_same_qdb(got, ref):
    assert got.tensor_scale is None and ref.tensor_scale is None
    assert got.packed.shape == ref.packed.shape and got.block_scales.shape == ref.block_scales.shape
    bad_codes = (got.packed.cpu() != ref.packed.cpu()).sum().item()
    bad_scales = (got.block_scales.view(torch.uint8).cpu() != ref.block_scales.view(torch.uint8).cpu()).sum().item()
    o, orf = got.outer_scales.cpu(), ref.outer_scales.cpu()
    same_outer = (o.view(torch.int32) == orf.view(torch.int32)) | (o.isnan() & orf.isnan())
    assert bad_codes == 0 and bad_scales == 0 and same_outer.all(), \
        f"{bad_codes} code bytes, {bad_scales} inner scales, {int((~same_outer).sum())} outer scales differ"
    assert int(got.flushed_blocks) == int(ref.flushed_blocks)


def _stream(seed, row_offset=0, col_offset=0):
    return RandomStream(derive_key(seed, 3), row_offset, col_offset)


def _sigma(seed, device="cpu"):
    return random_signs(derive_key(seed, 6), 16, device)


def _ref(x, mode, stream=None, headroom=1.0, ties="even"):
    return Q.quantize_double_block(x, mode=mode, stream=stream, sr_headroom=headroom, ties=ties)


@cpu_interp
@pytest.mark.parametrize("rows,cols,dtype,mode,headroom,ties", [
    (64, 256, torch.float32, "rn", 1.0, "even"),
    (40, 384, torch.bfloat16, "rn", 1.0, "away"),         # partial row tile, 3 outer blocks
    (64, 256, torch.float32, "sr", 1.0, "even"),
    (40, 128, torch.bfloat16, "sr", 17.0 / 16.0, "even"),
])
def test_qdb_matches_reference(rows, cols, dtype, mode, headroom, ties):
    x = data(rows, cols, seed=rows + cols, dtype=dtype)
    stream = _stream(rows, row_offset=7, col_offset=256) if mode == "sr" else None
    got = qdb_kernel(x, mode=mode, stream=stream, sr_headroom=headroom, ties=ties)
    assert_same_qdb(got, _ref(x, mode, stream, headroom, ties))
    if mode == "sr":   # the draws matter: another stream gives other codes
        other = qdb_kernel(x, mode=mode, stream=_stream(rows + 1), sr_headroom=headroom)
        assert not torch.equal(other.packed, got.packed)


@cpu_interp
def test_qdb_wide_tile_and_ties():
    # values on every E2M1 midpoint after scaling (the 128-block max maps to exactly 6); BC=256
    row = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] * 2)
    x = torch.cat([torch.stack([row, -row, row * 2.0 ** -3, row * 2.0 ** 5]).repeat(1, 8),
                   data(4, 128, seed=3)], 1)
    for ties in ("even", "away"):
        assert_same_qdb(qdb_kernel(x, ties=ties, block_c=256), _ref(x, "rn", ties=ties))


@cpu_interp
def test_qdb_just_below_binade_edges():
    # quotients one ulp below 1, 2, 4, 6 and just above the midpoints: the outer max 2688 gives
    # s_out = 1 and a block max of 6*4 gives s_in = 4, so y = x/4 exactly (regression: the E2M1
    # FP32-RNE trick once rounded 4 - 2^-22 to 3 and 2 - 2^-23 to 1.5)
    below = [torch.nextafter(torch.tensor(v), torch.tensor(0.0)).item() for v in (1.0, 2.0, 4.0, 6.0)]
    above = [torch.nextafter(torch.tensor(v), torch.tensor(9.0)).item() for v in (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)]
    vals = torch.tensor([24.0] + [4 * v for v in below + above] + [4 * 3.5, 4 * 2.5, 4 * 5.0, 4 * 0.25])
    row = torch.zeros(128)
    row[0] = 2688.0
    row[16:32] = vals
    x = torch.stack([row, -row, row * 2.0 ** -20])
    for ties in ("even", "away"):
        assert_same_qdb(qdb_kernel(x, ties=ties), _ref(x, "rn", ties=ties))
    assert_same_qdb(qdb_kernel(x, mode="sr", stream=_stream(1)), _ref(x, "sr", _stream(1)))


@cpu_interp
def test_qdb_special_values():
    x = data(32, 256, seed=5)
    x[1, :128] = 0.0                                   # all-zero outer block: s_out = 1
    x[2, 16:32] = 0.0                                  # zero inner block: t = 2^-9
    x[3, :16] = 1e-30                                  # flushed inner blocks next to a large one
    x[3, 16] = 1e4
    x[4, 128:] = torch.randn(128) * 3e38               # huge values
    x[5, 130:140] = 1e-40                              # subnormal inputs
    x[6, 128:256] = 1e-36                              # subnormal outer scale (interpreter: no FTZ)
    for mode in ("rn", "sr"):
        stream = _stream(11) if mode == "sr" else None
        ref = _ref(x, mode, stream)
        assert int(ref.flushed_blocks) > 0
        assert_same_qdb(qdb_kernel(x, mode=mode, stream=stream), ref)
    zeros = torch.zeros(8, 128)
    assert_same_qdb(qdb_kernel(zeros), _ref(zeros, "rn"))
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[9, 200] = bad
        got = qdb_kernel(y, mode="sr", stream=_stream(2))
        assert got.outer_scales.isnan().all()          # the non-finite poisons every outer scale
        assert_same_qdb(got, _ref(y, "sr", _stream(2)))


@cpu_interp
@pytest.mark.parametrize("mode", ["rn", "sr"])
def test_qdb_transposed_source(mode):
    a = data(256, 48, seed=7, dtype=torch.bfloat16)    # A [T, N]; operand A^T [N, T], blocks along T
    stream = _stream(4, row_offset=3) if mode == "sr" else None
    got = qdb_kernel(a, mode=mode, stream=stream, transpose=True)
    assert_same_qdb(got, _ref(a.t(), mode, stream))
    # padded: T = 200 -> 256 by masking, as pad_cols would
    got = qdb_kernel(a[:200], mode=mode, stream=stream, transpose=True, pad_multiple=128)
    assert_same_qdb(got, _ref(torch.nn.functional.pad(a[:200].t(), (0, 56)), mode, stream))


@cpu_interp
@pytest.mark.parametrize("transpose,dtype,pad", [(False, torch.float32, 1), (True, torch.bfloat16, 128),
                                                 (True, torch.float32, 1)])
def test_rht16_fused(transpose, dtype, pad):
    a = data(256 if transpose else 40, 72 if transpose else 256, seed=9, dtype=dtype)
    if pad > 1:
        a = a[:150]
    sigma, stream = _sigma(1), _stream(5, col_offset=128)
    got = qdb_kernel(a, mode="sr", stream=stream, sigma=sigma, transpose=transpose, pad_multiple=pad,
                     sr_headroom=17.0 / 16.0)
    z = rht16(a, sigma, transpose=transpose, pad_multiple=pad)
    assert_same_qdb(got, _ref(z, "sr", stream, 17.0 / 16.0))
    src = a.t() if transpose else a
    z_ref = rht(torch.nn.functional.pad(src, (0, (-src.shape[1]) % pad)), sigma)
    err = ((z - z_ref).norm() / z_ref.norm()).item()
    assert err < 1e-6, err
    rn = qdb_kernel(a, sigma=sigma, transpose=transpose, pad_multiple=pad)
    assert_same_qdb(rn, _ref(z, "rn"))


def test_dispatch_cpu_takes_the_reference():
    x = data(32, 256, seed=12)
    assert not D.kernels_enabled(x)
    stream, sigma = _stream(3), _sigma(2)
    for kw in (dict(), dict(mode="sr", stream=stream, sr_headroom=17 / 16), dict(outer_block="tensor")):
        assert_same_qdb(D.quantize_double_block(x, **kw), Q.quantize_double_block(x, **kw))
    a = data(100, 32, seed=13)                         # [T, N], T padded to 128
    got = D.rht_double_block(a, sigma, stream, transpose=True, mode="sr", pad_multiple=128)
    ref = Q.quantize_double_block(rht(torch.nn.functional.pad(a.t(), (0, 28)), sigma), mode="sr",
                                  stream=stream)
    assert_same_qdb(got, ref)
    got = D.rht_double_block(x, sigma, None, mode="rn", ties="away")
    assert_same_qdb(got, Q.quantize_double_block(rht(x, sigma), ties="away"))


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_qdb_gpu_bit_exact(dtype):
    x = data(1024, 2048, seed=21, dtype=dtype, device="cuda")
    for mode, headroom in (("rn", 1.0), ("sr", 1.0), ("sr", 17.0 / 16.0)):
        stream = _stream(2, 64, 128) if mode == "sr" else None
        assert_same_qdb(D.quantize_double_block(x, mode=mode, stream=stream, sr_headroom=headroom),
                        _ref(x, mode, stream, headroom))
    # the GPU's uniforms are the CPU's (same counter hash on both devices)
    stream = _stream(3)
    cpu = _ref(x[:64].cpu(), "sr", stream)
    assert_same_qdb(qdb_kernel(x[:64], mode="sr", stream=stream), cpu)


@gpu
@needs_cuda
@pytest.mark.parametrize("transpose", [False, True])
def test_rht_qdb_gpu_bit_exact(transpose):
    a = data(2048, 1024, seed=22, dtype=torch.bfloat16, device="cuda")
    sigma, stream = _sigma(1, "cuda"), _stream(4)
    got = D.rht_double_block(a, sigma, stream, transpose=transpose, mode="sr")
    z = rht16(a, sigma, transpose=transpose)
    assert_same_qdb(got, _ref(z, "sr", stream))
    src = a.t() if transpose else a
    z_ref = rht(src, sigma)
    assert ((z - z_ref).norm() / z_ref.norm()).item() < 1e-6
    assert_same_qdb(qdb_kernel(a, mode="sr", stream=stream, transpose=transpose),
                    _ref(src, "sr", stream))


@gpu
@needs_cuda
def test_rht_qdb_gpu_fp32_source():
    w = data(512, 1024, seed=23, dtype=torch.float32, device="cuda")
    sigma, stream = _sigma(2, "cuda"), _stream(5)
    got = D.rht_double_block(w, sigma, stream, transpose=True, mode="sr")
    z = rht16(w, sigma, transpose=True)
    assert_same_qdb(got, _ref(z, "sr", stream))
    assert ((z - rht(w.t(), sigma)).norm() / z.norm()).item() < 1e-6


@cpu_interp
def test_sr_two_piece_counters_match_the_reference():
    # the N dim of SwiGLU's fc1 at TP > 1 (rng.TwoPieces), on rows (W^T after transpose) and columns
    from megatron_fp4.rng import TwoPieces
    x = data(48, 256, seed=33)
    stream = _stream(6, TwoPieces(0, 16, 200), TwoPieces(128, 128, 512))
    assert_same_qdb(qdb_kernel(x, mode="sr", stream=stream), _ref(x, "sr", stream))


@cpu_interp
@pytest.mark.parametrize("rows,cols,mode", [(40, 256, "rn"), (33, 384, "sr"), (8, 128, "rn")])
def test_double_block_dequant_kernel_is_the_reference(rows, cols, mode):
    from megatron_fp4.kernels.dequant import dequantize_double_block
    x = data(rows, cols, seed=rows + cols)                 # spread rows: subnormal scales, flushed blocks
    q = Q.quantize_double_block(x, mode=mode, stream=_stream(4) if mode == "sr" else None)
    ref = q.dequantize()
    got = dequantize_double_block(q)
    assert got.dtype == torch.float32 and torch.equal(got.view(torch.int32), ref.view(torch.int32))
    got16 = dequantize_double_block(q, torch.bfloat16)     # gemm.matmul "bf16" mode: RNE of the FP32 value
    assert torch.equal(got16.view(torch.int16), ref.to(torch.bfloat16).view(torch.int16))


@cpu_interp
def test_double_block_dequant_kernel_nan_and_bad_input():
    from megatron_fp4.kernels.dequant import dequantize_double_block
    x = data(16, 256, seed=5)
    x[3, 7] = float("inf")
    q = Q.quantize_double_block(x)
    assert torch.isnan(q.outer_scales).all() and torch.isnan(dequantize_double_block(q)).all()
    with pytest.raises(ValueError, match="outer scales"):
        dequantize_double_block(Q.quantize_nvfp4(data(16, 256)))
    with pytest.raises(ValueError, match="out_dtype"):
        dequantize_double_block(Q.quantize_double_block(data(16, 256)), torch.float16)


@gpu
@needs_cuda
def test_double_block_gemm_and_dequant_gpu_match_the_reference():
    from megatron_fp4.gemm import matmul as reference_matmul
    a = Q.quantize_double_block(data(512, 1024, seed=1, device="cuda"), mode="sr", stream=_stream(1))
    b = Q.quantize_double_block(data(384, 1024, seed=2, device="cuda", spread=False))
    assert torch.equal(D.dequantize(a).view(torch.int32), a.dequantize().view(torch.int32))
    assert torch.equal(D.matmul(a, b, "bf16"), reference_matmul(a, b, "bf16"))


@cpu_interp
@pytest.mark.parametrize("rows,cols,pad", [(256, 128, 1), (200, 256, 128)])
def test_requantize_from_packed_equals_the_fp32_source_path(rows, cols, pad):
    """TetraJet-v2's X^T / W^T: the kernel reading the packed forward operand gives the same codes,
    inner and outer scales as the same kernel fed its FP32 dequantization (the old path), and as the
    reference composition on the kernel's own rotation; token padding (200 -> 256) by masking."""
    from megatron_fp4.kernels.double_block import quantize_double_block as kernel, rht16
    from megatron_fp4.rng import RandomStream, derive_key, random_signs
    x = data(rows, cols, seed=rows + cols)
    xq = Q.quantize_double_block(x)                      # the saved forward operand [T, K]
    sigma = random_signs(derive_key(3, 5), 16)
    stream = RandomStream(derive_key(4, 3), 7, 0)
    kw = dict(mode="sr", stream=stream, sr_headroom=17 / 16, sigma=sigma, transpose=True, pad_multiple=pad)
    got = kernel(None, packed_source=xq, **kw)
    via_fp32 = kernel(xq.dequantize(), **kw)
    for a, b in ((got.packed, via_fp32.packed), (got.block_scales.view(torch.uint8), via_fp32.block_scales.view(torch.uint8))):
        assert torch.equal(a, b)
    assert torch.equal(got.outer_scales, via_fp32.outer_scales)
    z = rht16(xq.dequantize(), sigma, transpose=True, pad_multiple=pad)
    ref = Q.quantize_double_block(z, mode="sr", stream=stream, sr_headroom=17 / 16)
    assert torch.equal(got.packed, ref.packed) and torch.equal(got.outer_scales, ref.outer_scales)
    with pytest.raises(ValueError, match="transpose=True"):
        kernel(None, packed_source=xq, mode="rn")


@gpu
@needs_cuda
def test_requantize_from_packed_gpu_equals_the_fp32_source_path():
    from megatron_fp4.kernels.double_block import quantize_double_block as kernel
    from megatron_fp4.rng import RandomStream, derive_key, random_signs
    x = data(4096, 1024, seed=61, dtype=torch.bfloat16, device="cuda")
    xq = kernel(x)
    sigma = random_signs(derive_key(3, 5), 16, "cuda")
    kw = dict(mode="sr", stream=RandomStream(derive_key(4, 3)), sr_headroom=17 / 16, sigma=sigma, transpose=True)
    got, via_fp32 = kernel(None, packed_source=xq, **kw), kernel(xq.dequantize(), **kw)
    assert torch.equal(got.packed, via_fp32.packed)
    assert torch.equal(got.block_scales.view(torch.uint8), via_fp32.block_scales.view(torch.uint8))
    assert torch.equal(got.outer_scales, via_fp32.outer_scales)


@cpu_interp
@pytest.mark.parametrize("case", ["rn", "sr-rht", "sr-rht-transposed", "from-packed", "nan"])
def test_emitted_bf16_gemm_operand(case):
    """emit_operand: the kernel also writes dequantize().to(bfloat16), the "bf16" GEMM emulation's
    operand (RNE of (q * s_in) * s_out), bit for bit, with codes and scales unchanged; operand_poison
    is 1, or NaN when the source held a non-finite value."""
    from megatron_fp4.kernels.double_block import quantize_double_block as kernel
    x = data(128, 256, seed=71)
    sigma = random_signs(derive_key(3, 5), 16)
    sr = dict(mode="sr", stream=RandomStream(derive_key(4, 3)), sr_headroom=17 / 16, sigma=sigma)
    if case == "nan":
        x[5, 9] = float("nan")
    args, kw = {"rn": ((x,), {}), "nan": ((x,), {}), "sr-rht": ((x,), sr),
                "sr-rht-transposed": ((x,), dict(sr, transpose=True)),
                "from-packed": ((None,), dict(sr, transpose=True, packed_source=Q.quantize_double_block(x)))}[case]
    plain = kernel(*args, **kw)
    got = kernel(*args, emit_operand=True, **kw)
    assert torch.equal(got.packed, plain.packed)
    assert torch.equal(got.block_scales.view(torch.uint8), plain.block_scales.view(torch.uint8))
    assert torch.equal(got.outer_scales.nan_to_num(), plain.outer_scales.nan_to_num())
    if case == "nan":
        assert got.operand_poison.isnan() and got.outer_scales.isnan().all()
        # the operand holds the values of the unpoisoned scales (the NaN element quantized as 0)
        got.outer_scales = kernel(x.nan_to_num(0.0)).outer_scales
        assert torch.equal(got.operand, got.dequantize().to(torch.bfloat16))
    else:
        assert float(got.operand_poison) == 1.0
        assert torch.equal(got.operand, got.dequantize().to(torch.bfloat16))
    assert (got.operand != 0).any()


@gpu
@needs_cuda
def test_bf16_mode_gemm_with_emitted_operands_equals_the_dequant_path():
    from megatron_fp4.kernels.double_block import quantize_double_block as kernel
    x = data(2048, 1024, seed=72, dtype=torch.bfloat16, device="cuda")
    w = data(768, 1024, seed=73, spread=False, dtype=torch.bfloat16, device="cuda")
    for poison in (False, True):
        if poison:
            x[3, 4] = float("inf")
        xe, we = kernel(x, emit_operand=True), kernel(w, emit_operand=True)
        xp, wp = kernel(x), kernel(w)
        got = D.matmul(xe, we, "bf16", out_dtype=torch.bfloat16)
        assert xe.operand is None and we.operand is None            # used once, dropped
        want = D.matmul(xp, wp, "bf16", out_dtype=torch.bfloat16)
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
        assert got.isnan().all() == poison
