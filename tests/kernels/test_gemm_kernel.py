"""The packed-operand GEMM kernel (kernels/gemm.py) against float64 brute force and gemm.matmul.

Bit-exact cases use operands whose FP32 sums are exact (codes times block scales from {1, 1.5, 2},
K <= 400: every partial sum is a multiple of 2^-4 below 2^17, so 21 bits), which makes the result
independent of summation order; general data is checked against the FP32 accumulation error bound.
"""
import pytest
import torch

from megatron_fp4 import backend as B
from megatron_fp4 import format as fmt
from megatron_fp4 import quantizers as Q
from megatron_fp4.gemm import matmul as reference_matmul
from megatron_fp4.kernels import dispatch as D
from megatron_fp4.kernels.gemm import CONFIGS, nvfp4_matmul
from megatron_fp4.tensor import NVFP4Tensor

from kernel_test_util import cpu_interp, data, gpu, needs_cuda

# E2M1 magnitudes by code, written out here (independent of format.py's table)
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _values64(codes: torch.Tensor) -> torch.Tensor:
    mag = torch.tensor(E2M1, dtype=torch.float64)[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -mag, mag)


def make_operand(rows, cols, seed, scale_set=(1.0, 1.5, 2.0), block_rows=1, tensor_scale=None,
                 outer=False, device="cpu"):
    """(NVFP4Tensor with random codes and scales from scale_set, its float64 values without g / outer)."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (rows, cols), generator=gen, dtype=torch.uint8)
    pick = torch.randint(0, len(scale_set), (rows // block_rows, cols // 16), generator=gen)
    scales64 = torch.tensor(scale_set, dtype=torch.float64)[pick]
    expanded = scales64.repeat_interleave(16, dim=1).repeat_interleave(block_rows, dim=0)
    outer_scales = None
    if outer:
        outer_scales = torch.rand(rows, cols // 128, generator=gen) * 3 + 0.25   # arbitrary FP32 values
    t = NVFP4Tensor(packed=fmt.pack_e2m1(codes).to(device),
                    block_scales=scales64.to(torch.float8_e4m3fn).to(device),
                    tensor_scale=None if outer else torch.tensor(tensor_scale, dtype=torch.float32, device=device),
                    outer_scales=None if outer_scales is None else outer_scales.to(device), block_rows=block_rows)
    return t, _values64(codes) * expanded


@cpu_interp
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("extra", [None, 0.8125])
def test_per_tensor_exact_sums_bit_exact(out_dtype, extra):
    # M, N not multiples of the tile, K a multiple of 16 but not of the K-step
    a, a64 = make_operand(70, 272, seed=1, tensor_scale=0.0371)
    b, b64 = make_operand(90, 272, seed=2, tensor_scale=3.3e-3)
    scale = None if extra is None else torch.tensor(extra)
    got = nvfp4_matmul(a, b, scale=scale, out_dtype=out_dtype)
    exact = (a64 @ b64.t()).float()                   # exact in FP32 by construction
    assert torch.equal(exact.double(), a64 @ b64.t())
    want = exact * (a.tensor_scale * b.tensor_scale)  # the epilogue's FP32 ops, in order
    if scale is not None:
        want = want * scale
    assert got.dtype == out_dtype and got.shape == (70, 90)
    assert torch.equal(got, want.to(out_dtype))


@cpu_interp
def test_double_block_equals_exact_mode_bit_for_bit():
    # arbitrary FP32 outer scales: per-slab partials are exact, and the scaling and slab sum are the
    # same FP32 ops in the same order as gemm.matmul(mode="exact")
    a, a64 = make_operand(40, 384, seed=3, outer=True)
    b, b64 = make_operand(72, 384, seed=4, outer=True)
    got = nvfp4_matmul(a, b)
    want = reference_matmul(a, b, "exact")
    assert torch.equal(got, want)
    # and against float64 brute force with the outer scales applied element-wise (within FP32 rounding
    # of the three slab products and sums)
    full64 = (a64 * a.outer_scales.double().repeat_interleave(128, 1)) @ (
        b64 * b.outer_scales.double().repeat_interleave(128, 1)).t()
    assert torch.allclose(got.double(), full64, rtol=1e-6, atol=1e-6 * full64.abs().max().item())


@cpu_interp
def test_double_block_nan_outer_scale_poisons_its_rows():
    a, _ = make_operand(32, 256, seed=5, outer=True)
    b, _ = make_operand(48, 256, seed=6, outer=True)
    a.outer_scales[3, 1] = float("nan")
    got = nvfp4_matmul(a, b, out_dtype=torch.bfloat16)
    want = reference_matmul(a, b, "exact").to(torch.bfloat16)
    assert got[3].isnan().all() and not got[[0, 1, 2, 4]].isnan().any()
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


@cpu_interp
def test_16x16_tile_operand():
    a, a64 = make_operand(64, 160, seed=7, tensor_scale=0.5)
    b, b64 = make_operand(48, 160, seed=8, block_rows=16, tensor_scale=1.25)
    got = nvfp4_matmul(a, b)
    assert torch.equal(got.double(), (a64 @ b64.t()) * 0.625)
    assert torch.equal(got, reference_matmul(a, b))


@cpu_interp
def test_quantized_data_within_fp32_accumulation_bound():
    x = data(96, 512, seed=9)
    w = data(80, 512, seed=10, spread=False)
    a, b = Q.quantize_nvfp4(x, four_over_six=True), Q.quantize_nvfp4(w)
    got = nvfp4_matmul(a, b).double()
    a64, b64 = a.dequantize_unscaled().double(), b.dequantize_unscaled().double()
    g = (a.tensor_scale * b.tensor_scale).double()
    want = (a64 @ b64.t()) * g
    # FP32 accumulation of K exact products: |error| <= K * 2^-24 * sum|a||b| (+ the epilogue's rounding)
    bound = 512 * 2.0 ** -24 * (a64.abs() @ b64.abs().t()) * g + 2.0 ** -23 * want.abs()
    assert ((got - want).abs() <= bound).all()
    assert (got != 0).any()


@cpu_interp
def test_every_config_gives_the_same_exact_result():
    a, a64 = make_operand(33, 400, seed=11, tensor_scale=1.0)
    b, b64 = make_operand(65, 400, seed=12, tensor_scale=2.0)
    want = (a64 @ b64.t() * 2.0).float()
    for config in CONFIGS:
        assert torch.equal(nvfp4_matmul(a, b, config=config), want), config


@cpu_interp
def test_empty_and_bad_operands():
    a, _ = make_operand(16, 64, seed=13, tensor_scale=1.0)
    b, _ = make_operand(24, 64, seed=14, tensor_scale=1.0)
    empty = NVFP4Tensor(packed=a.packed[:0], block_scales=a.block_scales[:0], tensor_scale=a.tensor_scale)
    assert nvfp4_matmul(empty, b).shape == (0, 24)
    c, _ = make_operand(24, 32, seed=15, tensor_scale=1.0)
    with pytest.raises(ValueError, match="inner dims differ"):
        nvfp4_matmul(a, c)
    d, _ = make_operand(24, 128, seed=16, outer=True)
    e, _ = make_operand(16, 128, seed=17, tensor_scale=1.0)
    with pytest.raises(ValueError, match="double-block"):
        nvfp4_matmul(e, d)
    with pytest.raises(ValueError, match="out_dtype"):
        nvfp4_matmul(a, b, out_dtype=torch.float16)
    with pytest.raises(ValueError, match="unknown GEMM config"):
        nvfp4_matmul(a, b, config="huge")
    no_scale = NVFP4Tensor(packed=b.packed, block_scales=b.block_scales, tensor_scale=None)
    with pytest.raises(ValueError, match="tensor scale"):
        nvfp4_matmul(a, no_scale)


def test_dispatch_backend_choice_is_validated():
    with pytest.raises(ValueError, match="MEGATRON_FP4_GEMM"):
        B.BackendConfig.from_env({"MEGATRON_FP4_GEMM": "fastest"})
    for name in ("cublas", "triton"):
        assert D.gemm_backend(B.BackendConfig.from_env({"MEGATRON_FP4_GEMM": name})) == name
        with B.use(gemm=name):
            assert D.gemm_backend() == name


@gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["cublas", "triton"])
def test_gemm_backends_on_gpu(backend):
    """Both GEMM paths of the dispatch: bit-exact on exact-sum operands (per-tensor, 16x16 tiles,
    double block against the exact mode), within the FP32 bound on quantized randn."""
    with B.use(gemm=backend):
        _gemm_backend_checks()


def _gemm_backend_checks():
    a, a64 = make_operand(1000, 2048, seed=21, tensor_scale=0.0371, scale_set=(1.0, 2.0), device="cuda")
    b, b64 = make_operand(700, 2048, seed=22, tensor_scale=3.3e-3, scale_set=(1.0, 2.0), device="cuda")
    # K=2048: a is a multiple of 0.5 below 12, products multiples of 2^-2 below 144, sums < 2^19: exact
    exact = (a64 @ b64.t()).float().cuda()
    g = a.tensor_scale * b.tensor_scale
    for out_dtype in (torch.float32, torch.bfloat16):
        got = D.matmul(a, b, scale=torch.tensor(0.75, device="cuda"), out_dtype=out_dtype)
        assert torch.equal(got, ((exact * g) * 0.75).to(out_dtype))
    t16, t64 = make_operand(512, 2048, seed=23, block_rows=16, tensor_scale=1.5, scale_set=(1.0, 2.0), device="cuda")
    assert torch.equal(D.matmul(a, t16), (a64 @ t64.t()).float().cuda() * (a.tensor_scale * t16.tensor_scale))
    da, _ = make_operand(512, 1024, seed=24, outer=True, scale_set=(1.0, 2.0), device="cuda")
    db, _ = make_operand(384, 1024, seed=25, outer=True, scale_set=(1.0, 2.0), device="cuda")
    assert torch.equal(D.matmul(da, db, "exact"), reference_matmul(da, db, "exact"))
    x = data(2048, 4096, seed=26, device="cuda", dtype=torch.bfloat16)
    w = data(1536, 4096, seed=27, spread=False, device="cuda", dtype=torch.bfloat16)
    xq, wq = D.quantize_nvfp4(x, four_over_six=True), D.quantize_nvfp4(w)
    got = D.matmul(xq, wq).double()
    x64, w64 = xq.dequantize_unscaled().double(), wq.dequantize_unscaled().double()
    gg = (xq.tensor_scale * wq.tensor_scale).double()
    want = (x64 @ w64.t()) * gg
    bound = 4096 * 2.0 ** -24 * (x64.abs() @ w64.abs().t()) * gg + 2.0 ** -23 * want.abs()
    assert ((got - want).abs() <= bound).all()


@gpu
@needs_cuda
def test_emitted_operands_are_used_once_and_dropped():
    """A quantizer asked for its GEMM operand (for_gemm=True) writes it; D.matmul uses it instead of a
    dequant pass, gives the same result as without it, and drops it (a forward operand is then saved
    for backward at 4.5 bits, not with a BF16 copy)."""
    with B.use(gemm="cublas"):
        _emitted_operand_checks()


def _emitted_operand_checks():
    x = data(1024, 2048, seed=31, device="cuda", dtype=torch.bfloat16)
    w = data(768, 2048, seed=32, spread=False, device="cuda", dtype=torch.bfloat16)
    xq = D.quantize_nvfp4(x, smax=256.0, four_over_six=True, for_gemm=True)
    wq = D.quantize_nvfp4(w, smax=256.0, four_over_six=True, for_gemm=True)
    assert xq.operand is not None and wq.operand is not None
    assert torch.equal(xq.operand.float(), xq.dequantize_unscaled())
    got = D.matmul(xq, wq, out_dtype=torch.bfloat16)
    assert xq.operand is None and wq.operand is None
    assert torch.equal(got, D.matmul(xq, wq, out_dtype=torch.bfloat16))
