"""CPU and CUDA draw the same random bits and quantize identically (run with `-m gpu` on a GPU).

Elementwise quantization and the counter-based hash are exact integer/IEEE operations, so the torch
reference gives bit-identical results on both devices. Rotations (RHT) go through each device's GEMM,
whose FP32 summation order may differ, so rotated operands are compared through their dequantized
error statistics instead.
"""
import pytest
import torch

from megatron_fp4 import quantizers as Q
from megatron_fp4.rng import RandomStream, random_signs

pytestmark = pytest.mark.gpu

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def same_nvfp4(a, b):
    assert torch.equal(a.packed.cpu(), b.packed.cpu())
    assert torch.equal(a.block_scales.view(torch.uint8).cpu(), b.block_scales.view(torch.uint8).cpu())
    for x, y in ((a.tensor_scale, b.tensor_scale), (a.outer_scales, b.outer_scales)):
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.equal(x.cpu(), y.cpu())


@cuda
def test_random_bits_match():
    stream = RandomStream(123456, row_offset=77, col_offset=4096)
    assert torch.equal(stream.bits(300, 500).cpu(), stream.bits(300, 500, device="cuda").cpu())
    assert torch.equal(random_signs(9, 128), random_signs(9, 128, device="cuda").cpu())


@cuda
@pytest.mark.parametrize("kind", ["rtn", "rtn46", "tile", "sr", "qdb_rn", "qdb_sr", "eden128", "eden16"])
def test_quantizers_match(kind):
    x = torch.randn(512, 1024, generator=torch.Generator().manual_seed(1)) * 3
    s = RandomStream(5)
    fn = {
        "rtn": lambda t: Q.quantize_nvfp4(t),
        "rtn46": lambda t: Q.quantize_nvfp4(t, smax=256.0, four_over_six=True),
        "tile": lambda t: Q.quantize_nvfp4(t, block_rows=16),
        "sr": lambda t: Q.quantize_nvfp4(t, mode="sr", v=6 * 16 / 17, stream=s),
        "qdb_rn": lambda t: Q.quantize_double_block(t),
        "qdb_sr": lambda t: Q.quantize_double_block(t, mode="sr", stream=s),
        "eden128": lambda t: Q.quantize_ms_eden(t, stream=s),
        "eden16": lambda t: Q.quantize_ms_eden(t, stream=s, eden_group=16),
    }[kind]
    same_nvfp4(fn(x), fn(x.cuda()))


@cuda
def test_host_hashed_signs_equal_the_device_reference_and_are_reused():
    from megatron_fp4.kernels import dispatch as D
    got = D.rht_signs(31337, 128, "cuda")
    assert got.is_cuda and torch.equal(got.cpu(), random_signs(31337, 128, device="cuda").cpu())
    assert D.rht_signs(31337, 128, "cuda") is got          # one backward's operands share one copy
    assert not torch.equal(D.rht_signs(31338, 128, "cuda").cpu(), got.cpu())
