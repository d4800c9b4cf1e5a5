"""Graph-safe random streams in the kernels (rng.py): a stream whose per-call part is an int64 device
state is folded in-kernel (kernels/_common.stream_key) with the twins' uint32 ops, so every kernel
that draws gives, bit for bit, what it gives for the int key that state folds to; rewriting the
state in place (what happens before a CUDA-graph replay) changes the draws. Interpreter on CPU."""
import pytest
import torch

from megatron_fp4 import quantizers as Q
from megatron_fp4.kernels import _common as C
from megatron_fp4.kernels.double_block import quantize_double_block
from megatron_fp4.kernels.eden import rht_ms_eden
from megatron_fp4.kernels.rtn import quantize_nvfp4_rtn
from megatron_fp4.rng import RandomStream, Role, derive_key, random_signs

from kernel_test_util import assert_same_operand, data

STATIC = 0xC0FFEE42
STATES = [(0, 0), (7, 3), ((1 << 32) + 5, (1 << 40) + 1)]   # 64-bit fields: both halves folded


def _pair(step, call, role, offsets=(0, 0)):
    """(stream on a device state, the int-key stream it must equal: derive_key(derive_key(static, step,
    call), role))."""
    state = torch.tensor([step, call], dtype=torch.int64)
    dynamic = RandomStream(STATIC, *offsets, state=state).for_role(role)
    return dynamic, RandomStream(derive_key(derive_key(STATIC, step, call), int(role)), *offsets), state


@pytest.mark.parametrize("step,call", STATES)
def test_signs_kernel_matches_the_int_key(step, call):
    dynamic, ref, _ = _pair(step, call, Role.RHT_SIGNS)
    assert torch.equal(C.random_signs(dynamic, 300, "cpu"), random_signs(ref.key, 300))
    assert torch.equal(C.random_signs(RandomStream(0xFFFFFFFE), 33, "cpu"), random_signs(0xFFFFFFFE, 33))


@pytest.mark.parametrize("step,call", STATES[:2])
def test_rtn_sr_kernel_reads_the_state(step, call):
    x = data(32, 64, seed=1)
    dynamic, ref, state = _pair(step, call, Role.DGRAD_GRAD_OUTPUT, offsets=(16, 48))
    got = quantize_nvfp4_rtn(x, mode="sr", v=6.0 / (17 / 16), stream=dynamic)
    assert_same_operand(got, Q.quantize_nvfp4(x, mode="sr", v=6.0 / (17 / 16), stream=ref))
    state[0] += 1                                      # in place: the next launch reads the new step
    moved = quantize_nvfp4_rtn(x, mode="sr", v=6.0 / (17 / 16), stream=dynamic)
    _, ref_next, _ = _pair(step + 1, call, Role.DGRAD_GRAD_OUTPUT, offsets=(16, 48))
    assert_same_operand(moved, Q.quantize_nvfp4(x, mode="sr", v=6.0 / (17 / 16), stream=ref_next))
    assert not torch.equal(moved.packed, got.packed)


def test_double_block_sr_kernel_reads_the_state():
    x = data(16, 256, seed=2)
    for step, call in STATES:
        dynamic, ref, _ = _pair(step, call, Role.WGRAD_INPUT)
        got = quantize_double_block(x, mode="sr", stream=dynamic)
        want = Q.quantize_double_block(x, mode="sr", stream=ref)
        assert torch.equal(got.packed, want.packed)
        assert torch.equal(got.block_scales.view(torch.uint8), want.block_scales.view(torch.uint8))
        assert torch.equal(got.outer_scales, want.outer_scales)


def test_eden_kernel_reads_the_state():
    a = data(16, 128, seed=3)
    sigma = random_signs(derive_key(4, 5), 128)
    dynamic, ref, state = _pair(7, 3, Role.WGRAD_GRAD_OUTPUT)
    got = rht_ms_eden(a, sigma, dynamic)
    assert_same_operand(got, rht_ms_eden(a, sigma, ref))       # the same kernel on the folded int key
    state[1] += 1
    other = rht_ms_eden(a, sigma, dynamic)
    assert_same_operand(other, rht_ms_eden(a, sigma, _pair(7, 4, Role.WGRAD_GRAD_OUTPUT)[1]))
    assert not torch.equal(other.block_scales.view(torch.uint8), got.block_scales.view(torch.uint8))


def test_state_on_another_device_is_refused():
    state = torch.zeros(2, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match="state is on meta"):
        C.stream_args(RandomStream(1, state=state), torch.zeros(1))
