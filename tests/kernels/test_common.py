"""Device helpers of kernels/_common.py against the torch reference, element by element, on a dense
value set: every BF16 value in [-10, 10], FP32 values within 4 ulp of every E2M1 midpoint, grid point
and binade edge, and random FP32."""
import pytest
import torch
import triton
import triton.language as tl

from megatron_fp4 import format as fmt
from megatron_fp4 import quantizers as Q
from megatron_fp4.kernels._common import e2m1_value, hash_uniform, rn_e2m1, sr_e2m1

from kernel_test_util import cpu_interp


@triton.jit
def _rn_e2m1_kernel(y_ptr, code_ptr, val_ptr, n, FORM: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    y = tl.load(y_ptr + offs, mask=mask, other=0.0)
    if FORM == 0:
        code, val = rn_e2m1(y, True)
    else:
        code, val = rn_e2m1(y, False, FORM == 2)
    tl.store(code_ptr + offs, code, mask=mask)
    tl.store(val_ptr + offs, val, mask=mask)


def _values() -> torch.Tensor:
    bf16 = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    bf16 = bf16[bf16.isfinite() & (bf16.abs() <= 10)]
    anchors = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0,
                            7.0, 8.0, 16.0, 2.0 ** -126, 2.0 ** -149])
    ulps = torch.arange(-4, 5, dtype=torch.int32)
    near = (anchors.view(torch.int32)[:, None] + ulps[None, :]).reshape(-1)
    near = near[near >= 0].view(torch.float32)
    gen = torch.Generator().manual_seed(3)
    rand = torch.randn(20000, generator=gen) * 3
    huge = torch.tensor([1e30, 3e38, 1e-30, 1e-45])
    y = torch.cat([bf16, near, -near, rand, huge, -huge])
    return y[y.isfinite()]


@cpu_interp
@pytest.mark.parametrize("form,ties", [(0, fmt.TIES_AWAY), (1, fmt.TIES_EVEN), (2, fmt.TIES_EVEN)],
                         ids=["ties-away-compares", "even-decoded-value", "even-code-from-sum"])
def test_rn_e2m1_matches_the_reference(form, ties):
    y = _values()
    code = torch.empty(y.shape, dtype=torch.uint8)
    val = torch.empty_like(y)
    block = 4096
    _rn_e2m1_kernel[(triton.cdiv(y.numel(), block),)](y, code, val, y.numel(), FORM=form, BLOCK=block)
    want = Q.encode_rn(y, ties)
    bad = (code != want).nonzero().reshape(-1)
    assert bad.numel() == 0, [(y[i].item(), code[i].item(), want[i].item()) for i in bad[:10]]
    assert (val == fmt.decode_e2m1(want)).all()     # the code's value (== treats -0 and +0 alike)


@triton.jit
def _e2m1_value_kernel(code_ptr, val_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(val_ptr + offs, e2m1_value(tl.load(code_ptr + offs)))


@cpu_interp
def test_e2m1_value_decodes_every_code():
    codes = torch.arange(16, dtype=torch.uint8)
    vals = torch.empty(16)
    _e2m1_value_kernel[(1,)](codes, vals, BLOCK=16)
    want = fmt.decode_e2m1(codes)
    assert torch.equal(vals.view(torch.int32), want.view(torch.int32))   # bit for bit, -0 for code 8


@triton.jit
def _sr_e2m1_kernel(y_ptr, u_ptr, code_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    code = sr_e2m1(tl.load(y_ptr + offs, mask=mask, other=0.0), tl.load(u_ptr + offs, mask=mask, other=0.0))
    tl.store(code_ptr + offs, code, mask=mask)


@cpu_interp
def test_sr_e2m1_matches_the_reference():
    """Stochastic E2M1 rounding against quantizers.encode_sr on the dense value set, each value with
    uniforms at 0, just below and at its round-up probability, and random ones (multiples of 2^-24,
    as the counter hash makes them)."""
    y = _values()
    mag = y.abs().clamp(max=6.0)
    lo = fmt.code_to_magnitude(fmt.e2m1_lower_code(mag))
    hi = fmt.code_to_magnitude((fmt.e2m1_lower_code(mag) + 1).clamp(max=7))
    prob = torch.where(hi > lo, (mag - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi)), torch.zeros_like(mag))
    gen = torch.Generator().manual_seed(5)
    grid = 2.0 ** -24
    uniforms = [torch.zeros_like(y), (torch.floor(prob / grid) * grid), (torch.floor(prob / grid) * grid - grid).clamp(min=0),
                torch.randint(0, 1 << 24, y.shape, generator=gen).float() * grid]
    for u in uniforms:
        code = torch.empty(y.shape, dtype=torch.uint8)
        _sr_e2m1_kernel[(triton.cdiv(y.numel(), 4096),)](y, u, code, y.numel(), BLOCK=4096)
        want = Q.encode_sr(y, u)
        bad = (code != want).nonzero().reshape(-1)
        assert bad.numel() == 0, [(y[i].item(), u[i].item(), code[i].item(), want[i].item()) for i in bad[:10]]


@triton.jit
def _uniform_kernel(hi_ptr, lo_ptr, u_ptr, key, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    hi = tl.load(hi_ptr + offs).to(tl.uint32, bitcast=True)
    lo = tl.load(lo_ptr + offs).to(tl.uint32, bitcast=True)
    tl.store(u_ptr + offs, hash_uniform(key, hi, lo))


@cpu_interp
def test_hash_uniform_matches_the_reference():
    """The kernels' counter-hash uniform equals rng.uniform_from_bits(rng.hash_counter(...)) bit for
    bit (65536 counters; both values of the top bit occur)."""
    from megatron_fp4 import rng
    from megatron_fp4.kernels._common import signed_key
    gen = torch.Generator().manual_seed(11)
    hi = torch.randint(0, 1 << 31, (65536,), generator=gen, dtype=torch.int64)
    lo = torch.randint(0, 1 << 31, (65536,), generator=gen, dtype=torch.int64)
    key = 0xDEADBEEF
    u = torch.empty(65536)
    _uniform_kernel[(16,)](hi.to(torch.int32), lo.to(torch.int32), u, signed_key(key), BLOCK=4096)
    want = rng.uniform_from_bits(rng.hash_counter(key, hi, lo))
    assert torch.equal(u.view(torch.int32), want.view(torch.int32))
    assert (want >= 0.5).any() and (want < 0.5).any()
