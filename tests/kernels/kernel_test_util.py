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


def assert_same_46(got, ref, x):
    """4/6 operands: bit-exact except where the two candidates' SSEs tie or nearly tie.

    The kernel sums exact squared errors in FP64; the reference sums rounded FP32 squares, so when
    |SSE4 - SSE6| is within FP32 rounding (exact ties are common: s4 = 1.5*s6 puts both candidates on
    shared grid points) the reference's pick is rounding noise. For every differing block: the
    kernel's exact SSE must be <= the reference's, within 1e-6 relative (a near-tie), and on an
    exact tie the kernel must hold the smaller scale (the spec's tie rule: max->6).
    Returns the number of such blocks."""
    rows, cols = x.shape
    sk = got.block_scales.float().cpu()
    sr = ref.block_scales.float().cpu()
    ck = got.codes().cpu().reshape(rows, cols // 16, 16)
    cr = ref.codes().cpu().reshape(rows, cols // 16, 16)
    differ = (sk != sr) | (ck != cr).any(dim=2)
    assert torch.equal(got.tensor_scale.cpu().view(torch.int32), ref.tensor_scale.cpu().view(torch.int32))
    if differ.any():
        from megatron_fp4 import format as fmt
        xg = (x.float().cpu() / got.tensor_scale.cpu()).double().reshape(rows, cols // 16, 16)
        dk = fmt.decode_e2m1(ck).double() * sk.double()[..., None]
        dr = fmt.decode_e2m1(cr).double() * sr.double()[..., None]
        sse_k = ((xg - dk) ** 2).sum(dim=2)[differ]
        sse_r = ((xg - dr) ** 2).sum(dim=2)[differ]
        assert (sse_k <= sse_r).all(), "kernel chose the candidate with the larger exact SSE"
        assert ((sse_r - sse_k) <= 1e-6 * sse_r).all(), "a difference that is not a near-tie"
        tie = sse_k == sse_r
        assert (sk[differ][tie] <= sr[differ][tie]).all(), "exact tie not resolved to max->6"
    return int(differ.sum())
