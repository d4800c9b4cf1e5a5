"""Dispatch: kernels on CUDA tensors, references elsewhere, the backend's kernels="reference" forces references;
plus the dequant kernel (twin of NVFP4Tensor.dequantize_unscaled)."""
import contextlib

import pytest
import torch

from megatron_fp4 import backend
from megatron_fp4 import quantizers as Q
from megatron_fp4.hadamard import rht
from megatron_fp4.rng import RandomStream, derive_key, random_signs
from megatron_fp4.kernels import dispatch as D
from megatron_fp4.kernels.dequant import dequantize_unscaled_bf16

from kernel_test_util import assert_same_operand, cpu_interp, data, gpu, needs_cuda


def test_cpu_tensors_take_the_reference():
    x = data(16, 128, seed=1)
    assert not D.kernels_enabled(x)
    assert_same_operand(D.quantize_nvfp4(x, smax=256.0, four_over_six=True),
                        Q.quantize_nvfp4(x, smax=256.0, four_over_six=True))
    sigma = random_signs(derive_key(1, 5), 128)
    stream = RandomStream(derive_key(2, 3))
    assert_same_operand(D.rht_ms_eden(x, sigma, stream, transpose=True, pad_multiple=128),
                        Q.quantize_ms_eden(rht(torch.nn.functional.pad(x.t(), (0, 112)), sigma), stream=stream))
    xq = Q.quantize_nvfp4(data(128, 32, seed=2))
    assert_same_operand(D.requant_ms_eden(xq, sigma, stream),
                        Q.quantize_ms_eden(rht(xq.dequantize_unscaled().t(), sigma), stream=stream))


@cpu_interp
def test_dequant_kernel_exact():
    xq = Q.quantize_nvfp4(data(48, 96, seed=3), smax=256.0, four_over_six=True)
    got = dequantize_unscaled_bf16(xq)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got.float(), xq.dequantize_unscaled())
    tiles = Q.quantize_nvfp4(data(48, 96, seed=4), block_rows=16)     # NVIDIA's 16x16 weight tiles
    assert torch.equal(dequantize_unscaled_bf16(tiles).float(), tiles.dequantize_unscaled())


@gpu
@needs_cuda
def test_reference_backend_forces_reference():
    x = data(256, 512, seed=4, device="cuda", dtype=torch.bfloat16)
    with backend.use(kernels="auto"):
        assert D.kernels_enabled(x)
    with backend.reference_only():
        assert not D.kernels_enabled(x)
    assert not D.kernels_enabled(x, backend=backend.BackendConfig.from_env({"MEGATRON_FP4_KERNELS": "0"}))


@gpu
@needs_cuda
def test_dispatch_gpu_matches_reference():
    x = data(512, 1024, seed=5, device="cuda", dtype=torch.bfloat16)
    w = data(256, 1024, seed=6, device="cuda", dtype=torch.bfloat16)
    xq = D.quantize_nvfp4(x, smax=256.0, four_over_six=True)
    wq = D.quantize_nvfp4(w, smax=256.0, four_over_six=True)
    assert_same_operand(xq, Q.quantize_nvfp4(x, smax=256.0, four_over_six=True))
    assert torch.equal(D.dequantize_unscaled(xq).float(), xq.dequantize_unscaled())
    from megatron_fp4.gemm import matmul
    assert torch.equal(D.matmul(xq, wq), matmul(xq, wq))


@cpu_interp
def test_scale_cast_epilogue_bit_exact():
    # the fused GEMM epilogue: ((P * (ga*gb)) * extra).to(dtype), same FP32 ops as the reference path
    from megatron_fp4.kernels.dequant import scale_cast
    p = data(64, 96, seed=7) * 1e3
    ga, gb, gx = torch.tensor([3.7e-3]), torch.tensor([1.3e-2]), torch.tensor([0.61])
    want = ((p * (ga * gb)) * gx).to(torch.bfloat16)
    got = scale_cast(p.clone(), ga, gb, gx, torch.bfloat16)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    assert torch.equal(scale_cast(p.clone(), ga, gb), p * (ga * gb))


def test_signed_hadamard_is_built_once_per_sigma_and_rebuilt_after_an_in_place_change():
    from megatron_fp4.hadamard import hadamard_matrix
    from megatron_fp4.kernels._common import signed_hadamard
    from megatron_fp4.rng import random_signs
    pm1 = (hadamard_matrix(16) * 4).round()        # the +-1 Sylvester matrix (H * sqrt(16))
    sigma = random_signs(77, 16)
    first = signed_hadamard(sigma, "cpu", 16)
    assert torch.equal(first.float(), sigma[:, None] * pm1)   # independent: diag(sigma) H+-1
    assert signed_hadamard(sigma, "cpu", 16) is first
    equal_values = sigma.clone()                   # same values, another tensor: its own entry
    assert signed_hadamard(equal_values, "cpu", 16) is not first
    sigma.neg_()                                   # in place: the cached entry must not be served
    assert torch.equal(signed_hadamard(sigma, "cpu", 16).float(), sigma[:, None] * pm1)


def test_rht_signs_on_cpu_are_the_reference_signs():
    from megatron_fp4.rng import random_signs
    assert torch.equal(D.rht_signs(5, 128, "cpu"), random_signs(5, 128, "cpu"))
    assert torch.equal(D.rht_signs(5, 16, None), random_signs(5, 16))


def test_rht_of_on_cpu_is_the_reference_composition():
    a = data(40, 96, seed=3)
    sigma = random_signs(11, 16)
    padded = torch.nn.functional.pad(a.t(), (0, 128 - 40))
    assert torch.equal(D.rht_of(a, sigma, transpose=True, pad_multiple=128), rht(padded, sigma))
    assert torch.equal(D.rht_of(a, sigma), rht(a, sigma))


@gpu
@needs_cuda
def test_rht_of_gpu_kernel_matches_the_reference():
    dy = data(1000, 256, seed=4, device="cuda", dtype=torch.bfloat16)      # T=1000 pads to 1024
    sigma = random_signs(12, 16, "cuda")
    got = D.rht_of(dy, sigma, transpose=True, pad_multiple=16 * 64)
    ref = rht(torch.nn.functional.pad(dy.t(), (0, 24)), sigma)
    assert got.shape == ref.shape == (256, 1024)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-6


def _kernel_path_vs_torch_twins(recipe, x, w, dy, kernels, split=None, y_bit_exact=True):
    """Whole linear, kernel path against the torch twins with the same key: Y bit for bit (or to FP32
    summation order where a Triton GEMM sums in its own order); dX and dW differ only where the
    rotation's FP32 summation order moves a decision, so their difference must be far below that of
    two independent draws (another key). kernels(on) is a context that selects the path."""
    from megatron_fp4.linear import nvfp4_linear
    from megatron_fp4.recipe import QuantContext

    def run(key, on):
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        with kernels(on):
            y = nvfp4_linear(xr, wr, None, recipe, QuantContext(key=key, seed=recipe.seed), split=split)
            y.backward(dy)
        return y.detach().float(), xr.grad.float(), wr.grad.float()

    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    ker, ref, other = run(5, True), run(5, False), run(6, False)
    if y_bit_exact:
        assert torch.equal(ker[0], ref[0])
    else:
        assert rel(ker[0], ref[0]) < 1e-6
    for i in (1, 2):
        assert rel(ker[i], ref[i]) < 0.1 * rel(other[i], ref[i]), (recipe.name, i, rel(ker[i], ref[i]),
                                                                   rel(other[i], ref[i]))


@gpu
@needs_cuda
@pytest.mark.parametrize("name", ["nvidia", "tetrajet2", "quartet2", "quartet2-no46"])
def test_recipe_kernel_path_agrees_with_the_reference_path(name):
    """Whole linear on the GPU, kernels vs torch twins (dispatch.reference_only())."""
    from megatron_fp4.registry import load_recipe
    x = data(1024, 512, seed=7, device="cuda", dtype=torch.bfloat16, spread=False)
    w = data(384, 512, seed=8, device="cuda", dtype=torch.bfloat16, spread=False) * 0.05
    dy = data(1024, 384, seed=9, device="cuda", dtype=torch.bfloat16, spread=False)
    _kernel_path_vs_torch_twins(load_recipe(name), x, w, dy,
                                lambda on: contextlib.nullcontext() if on else D.reference_only())


def test_a_quantizer_written_operand_replaces_the_dequant_pass():
    # a backward operand that carries its BF16 GEMM operand (written by the MS-EDEN kernel on GPU)
    # is handed to the GEMM as is; one without it is dequantized
    q = Q.quantize_nvfp4(data(32, 64, seed=5))
    assert torch.equal(D.dequantize_unscaled(q), q.dequantize_unscaled())
    q.operand = q.dequantize_unscaled().to(torch.bfloat16)
    assert D.dequantize_unscaled(q) is q.operand


@cpu_interp
@pytest.mark.parametrize("rows,cols", [(64, 128), (48, 80), (160, 96)])
def test_packed_tile_transpose_kernel_matches_the_reference(rows, cols):
    # partial 64-blocks on both axes; codes and tile scales transposed, values identical
    from megatron_fp4.kernels.dequant import transpose_tiles as kernel
    from megatron_fp4.recipe import transpose_tiles as reference
    w = Q.quantize_nvfp4(data(rows, cols, seed=rows + cols), block_rows=16)
    got, want = kernel(w), reference(w)
    assert torch.equal(got.packed, want.packed)
    assert torch.equal(got.block_scales.view(torch.uint8), want.block_scales.view(torch.uint8))
    assert got.block_rows == 16 and torch.equal(got.tensor_scale, w.tensor_scale)
    assert torch.equal(got.dequantize(), w.dequantize().t())


@cpu_interp
@pytest.mark.parametrize("name", ["nvidia", "tetrajet2", "tetrajet2-exact", "quartet2", "quartet2-triton-gemm",
                                  "quartet2-no46", "tetrajet2-full", "quartet2-plus"])
def test_recipe_kernel_path_agrees_with_the_reference_path_in_the_interpreter(name):
    """The whole linear through the kernel path on CPU (backend kernels="interpret": every kernel
    in Triton's interpreter, with the operand hand-offs, packed re-quantization and GEMM epilogues of
    the GPU path) against the torch twins (exact-sum data is not needed for Y: both GEMMs run the same
    FP32 matmul on the same exact operands). The "-full" / "-plus" recipes run OutControl's split
    (every 10th input channel in MXFP8)."""
    from megatron_fp4.outcontrol import ChannelSplit
    from megatron_fp4.registry import load_recipe
    recipe_name, overrides, changes = {
        "tetrajet2-exact": ("tetrajet2", {"gemm_emulation": "exact"}, {}),
        "tetrajet2": ("tetrajet2", {"gemm_emulation": "bf16"}, {}),   # the GPU default, forced here
        "tetrajet2-full": ("tetrajet2-full", {"gemm_emulation": "bf16"}, {}),
        "quartet2-triton-gemm": ("quartet2", {}, {"gemm": "triton"}),
    }.get(name, (name, {}, {}))
    split = ChannelSplit.from_mask(torch.arange(256) % 10 == 3) if name.endswith(("-full", "-plus")) else None
    x = data(256, 256, seed=7, spread=False).to(torch.bfloat16)
    w = (data(128, 256, seed=8, spread=False) * 0.05).to(torch.bfloat16)
    dy = data(256, 128, seed=9, spread=False).to(torch.bfloat16)

    def kernels(on):
        return backend.use(kernels="interpret" if on else "reference", **changes)

    # the Triton GEMM sums in its own order
    _kernel_path_vs_torch_twins(load_recipe(recipe_name, overrides), x, w, dy, kernels, split=split,
                                y_bit_exact=not ("triton-gemm" in name or "exact" in name))
