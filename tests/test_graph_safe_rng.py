"""Graph-safe random streams (rng.py, issue #17 item 1): the per-call part of a stream key ([step,
call]) lives in an int64 device tensor that the twins (and kernels: tests/kernels/test_stream_state.py)
read when they draw. A captured CUDA graph keeps the host-static part and re-reads the tensor, so
rewriting it in place must give exactly the bits of a fresh eager call at the new (step, call).
The GPU test at the end captures NVFP4Linear in torch.cuda.graph."""
import os
import random

import pytest
import torch

from megatron_fp4 import rng
from megatron_fp4.linear import NVFP4Linear, nvfp4_linear
from megatron_fp4.megatron import state
from megatron_fp4.recipe import QuantContext
from megatron_fp4.registry import load_recipe
from megatron_fp4.rng import RandomStream, Role

M32 = (1 << 32) - 1
RECIPES = ["quartet2", "quartet2-no46", "quartet2-kernel", "quartet2-plus", "tetrajet2", "tetrajet2-full",
           "nvidia", "nvidia-46"]


# Pure-Python ints, from the documented definitions (lowbias32; derive_key folds each field's low then
# high 32 bits after the initial value lowbias32(0x6A09E667); H(key, hi, lo)).
def py_mix(x):
    x ^= x >> 16
    x = x * 0x7FEB352D % (1 << 32)
    x ^= x >> 15
    x = x * 0x846CA68B % (1 << 32)
    return x ^ (x >> 16)


def py_derive(*fields):
    k = py_mix(0x6A09E667)
    for f in fields:
        k = py_mix(((k ^ (f & M32)) + 0x9E3779B9) % (1 << 32))
        k = py_mix(k ^ (f >> 32))
    return k


def py_hash(key, hi, lo):
    h = py_mix((hi ^ key) & M32)
    h = py_mix(h ^ lo)
    return py_mix((h + 0x9E3779B9) % (1 << 32))


def test_state_stream_bits_enumerate_the_python_derivation():
    r = random.Random(5)
    cases = [(0, 0), (1, 0), (0, 1), (M32, M32), ((1 << 32) + 3, (1 << 47) + 11)] + \
            [(r.getrandbits(40), r.getrandbits(20)) for _ in range(8)]
    for step, call in cases:
        static = r.getrandbits(32)
        st = torch.tensor([step, call], dtype=torch.int64)
        for role in (None, 1, 5, 8):
            s = RandomStream(static, 100, 7, st)
            s = s if role is None else s.for_role(role)
            key = py_derive(static, step, call)
            key = key if role is None else py_derive(key, role)
            assert int(s.effective_key()) == key
            bits = s.bits(3, 4, col_step=16)
            assert bits.tolist() == [[py_hash(key, 100 + i, 7 + 16 * j) for j in range(4)] for i in range(3)]
            assert rng.random_signs(s, 40).tolist() == [1.0 - 2.0 * (py_hash(key, 0, i) >> 31) for i in range(40)]
    # a one-field state folds the same way
    st = torch.tensor([12345], dtype=torch.int64)
    assert int(RandomStream(9, state=st).effective_key()) == py_derive(9, 12345)


def test_state_stream_equals_the_int_key_stream_it_folds_to():
    st = torch.tensor([3, 2], dtype=torch.int64)
    dyn = RandomStream(77, 5, 9, st).for_role(Role.WGRAD_INPUT).shifted(16, 32)
    ref = RandomStream(rng.derive_key(rng.derive_key(77, 3, 2), int(Role.WGRAD_INPUT)), 16, 32)
    assert torch.equal(dyn.uniform(20, 30), ref.uniform(20, 30))
    st[1] = 4                                  # rewritten in place: the same stream object draws anew
    assert not torch.equal(dyn.bits(20, 30), ref.bits(20, 30))
    ref4 = RandomStream(rng.derive_key(rng.derive_key(77, 3, 4), int(Role.WGRAD_INPUT)), 16, 32)
    assert torch.equal(dyn.bits(20, 30), ref4.bits(20, 30))


def test_bad_states_are_refused():
    with pytest.raises(ValueError, match="1-D int64"):
        RandomStream(1, state=torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="1 to 4 fields"):
        RandomStream(1, state=torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="without one"):
        RandomStream(1, roles=(3,))
    with pytest.raises(ValueError, match="32-bit"):
        RandomStream(1 << 32)
    with pytest.raises(ValueError, match="at most one role"):
        RandomStream(1, state=torch.zeros(2, dtype=torch.int64)).for_role(1).for_role(2).kernel_key()


def test_set_iteration_rewrites_the_device_state_in_place():
    before = state.get_iteration()
    try:
        state.set_iteration(3)
        step = state.step_tensor("cpu")
        ptr = step.data_ptr()
        counter = state.CallCounter()
        first, second = counter.next_state("cpu"), counter.next_state("cpu")
        assert first.tolist() == [3, 0] and second.tolist() == [3, 1]
        state.set_iteration(9)
        assert state.step_tensor("cpu").data_ptr() == ptr and step.tolist() == [9]
        assert counter.next_state("cpu").tolist() == [9, 0]       # counters restart with the iteration
        state.set_iteration(9)                                      # the same iteration: calls go on
        assert counter.next_state("cpu").tolist() == [9, 1]
        assert first.tolist() == [3, 0]                             # a call's state is its own snapshot
        key = state.static_key(1234, 2, "decoder.layers.1.mlp.linear_fc1", 1)
        assert state.stream_key(1234, 9, 2, "decoder.layers.1.mlp.linear_fc1", 1, 1) == \
            int(RandomStream(key, state=torch.tensor([9, 1])).effective_key())
    finally:
        state.set_iteration(before)


def _shape(recipe):
    return 128, 128, 128       # in, out, tokens: multiples every recipe accepts


def _layer(name, seed=0):
    k, n, t = _shape(name)
    torch.manual_seed(seed)
    layer = NVFP4Linear(k, n, bias=False, recipe=name, layer_id=3)
    x = torch.randn(t, k)
    dy = torch.randn(t, n)
    return layer, x, dy


def _fwd_bwd(layer, x, dy):
    xr = x.clone().requires_grad_(True)
    layer.weight.grad = None
    y = layer(xr)
    y.backward(dy)
    return y.detach().clone(), xr.grad.clone(), layer.weight.grad.clone()


@pytest.mark.parametrize("name", RECIPES)
def test_step_rewritten_in_place_draws_each_steps_bits(name):
    """One layer, its step set in place between calls, against a fresh layer (same weights) at each
    step: bit-identical outputs and gradients (a resumed run continues the same stream), and the
    gradients differ from step to step and from call to call."""
    layer, x, dy = _layer(name)
    runs = {}
    for step in (0, 1, 5):
        layer.step = step
        runs[step] = [_fwd_bwd(layer, x, dy) for _ in range(2)]      # two calls (micro-batches)
    for step in (5, 0, 1):                                           # fresh layers, any order
        fresh, _, _ = _layer(name)
        fresh.step = step
        for call in range(2):
            got = _fwd_bwd(fresh, x, dy)
            for a, b in zip(got, runs[step][call]):
                assert torch.equal(a, b), (name, step, call)
    dw = lambda s, c: runs[s][c][2]
    assert not torch.equal(dw(0, 0), dw(1, 0)) and not torch.equal(dw(1, 0), dw(5, 0))
    assert not torch.equal(dw(0, 0), dw(0, 1))
    if name.startswith("nvidia"):           # dX: SR of E; the others rotate too
        assert not torch.equal(runs[0][0][1], runs[1][0][1])


@pytest.mark.parametrize("name", ["quartet2", "tetrajet2", "nvidia"])
def test_a_frozen_call_redraws_from_its_rewritten_state(name):
    """What a CUDA-graph replay does: the call's host part (QuantContext, key) fixed, its device state
    rewritten in place before the next run. The rerun equals a fresh call at the new state."""
    recipe = load_recipe(name)
    layer, x, dy = _layer(name)
    st = torch.tensor([4, 0], dtype=torch.int64)
    frozen = QuantContext(key=layer.stream_key(), state=st, seed=recipe.seed)

    def run(ctx):
        xr, wr = x.clone().requires_grad_(True), layer.weight.detach().clone().requires_grad_(True)
        nvfp4_linear(xr, wr, None, recipe, ctx).backward(dy)
        return xr.grad, wr.grad

    first = run(frozen)
    st.copy_(torch.tensor([5, 0]))
    second = run(frozen)
    layer.step = 5
    fresh = _fwd_bwd(layer, x, dy)
    assert torch.equal(second[0], fresh[1]) and torch.equal(second[1], fresh[2])
    assert not torch.equal(first[1], second[1])
    int_key = QuantContext(key=rng.derive_key(layer.stream_key(), 5, 0), seed=recipe.seed)
    assert torch.equal(run(int_key)[1], second[1])          # the int key the state folds to


def test_bf16_layer_ignores_the_stream():
    layer, x, dy = _layer("bf16")
    layer.step = 2
    y = layer(x)
    assert torch.equal(y, torch.nn.functional.linear(x, layer.weight))
    with pytest.raises(ValueError, match="step must be >= 0"):
        layer.step = -1


gpu_only = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("MEGATRON_FP4_TEST_GPU") != "1",
                              reason="needs a CUDA device and MEGATRON_FP4_TEST_GPU=1")


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("name", RECIPES)
def test_cuda_graph_replays_draw_fresh_bits_equal_to_eager(name):
    """NVFP4Linear forward+backward captured in torch.cuda.graph; `layer.step = s` (in place) before each
    replay: consecutive replays give different weight gradients, each bit-identical to the eager run at
    that step (kernel path)."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    k = n = t = 256
    layer = NVFP4Linear(k, n, bias=False, recipe=name, layer_id=1, device=dev, dtype=torch.bfloat16)
    x = torch.randn(t, k, device=dev, dtype=torch.bfloat16).requires_grad_(True)
    dy = torch.randn(t, n, device=dev, dtype=torch.bfloat16)

    def step_fn():
        layer.weight.grad = None
        x.grad = None
        layer(x).backward(dy)
        return layer.weight.grad, x.grad

    eager = {}
    for s in (0, 1, 2, 3):
        layer.step = s
        dw, dx = step_fn()
        eager[s] = (dw.clone(), dx.clone())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):          # warm-up on a side stream, as torch.cuda.graph asks
        for _ in range(2):
            layer.step = 0
            step_fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    layer.weight.grad = x.grad = None
    layer.step = 0
    with torch.cuda.graph(graph):
        dw_static, dx_static = step_fn()
    replays = {}
    for s in (1, 2, 3):
        layer.step = s                      # in place: fill_ on the captured state tensor
        graph.replay()
        torch.cuda.synchronize()
        replays[s] = (dw_static.clone(), dx_static.clone())
        assert torch.equal(replays[s][0], eager[s][0]), (name, s)
        assert torch.equal(replays[s][1], eager[s][1]), (name, s)
    assert not torch.equal(replays[1][0], replays[2][0]) and not torch.equal(replays[2][0], replays[3][0])
