"""Helpers shared by the kernel tests: operand comparison and test data (never all zeros)."""
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(),
                                reason="needs a CUDA device and TRITON_INTERPRET unset")
cpu_interp = pytest.mark.skipif(not INTERPRET, reason="runs kernels in the Triton interpreter")


def assert_same_operand(got, ref, check_counts=True):
    """Bit-exact equality of packed codes, E4M3 scale bytes and the FP32 tensor scale."""
    assert got.packed.shape == ref.packed.shape
    assert got.block_scales.shape == ref.block_scales.shape
    bad_codes = (got.packed != ref.packed).sum().item()
    bad_scales = (got.block_scales.view(torch.uint8) != ref.block_scales.view(torch.uint8)).sum().item()
    assert bad_codes == 0 and bad_scales == 0, f"{bad_codes} code bytes and {bad_scales} scales differ"
    g, gr = got.tensor_scale.float().cpu(), ref.tensor_scale.float().cpu()
    assert (g.view(torch.int32) == gr.view(torch.int32)).all() or (g.isnan() & gr.isnan()).all(), (g, gr)
    if check_counts:
        assert int(got.flushed_blocks) == int(ref.flushed_blocks)
        if ref.clamped_scales is not None:
            assert int(got.clamped_scales) == int(ref.clamped_scales)


def data(rows, cols, seed=0, dtype=torch.float32, device="cpu", spread=True):
    """Gaussian data; with `spread` rows span 2^-12..2^12 so block scales cover the E4M3 range,
    subnormal scales and flushed blocks included."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen)
    if spread:
        x = x * torch.exp2(torch.linspace(-12, 12, rows))[:, None]
    return x.to(dtype=dtype, device=device)
