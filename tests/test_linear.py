"""The autograd linear: the GEMM table wiring, exact emulation, packed saved operands, padding,
main_grad accumulation, determinism and bad input."""
import pytest
import torch

from megatron_fp4 import quantizers as Q
from megatron_fp4.hadamard import rht
from megatron_fp4.linear import NVFP4Linear, NVFP4LinearFunction, nvfp4_linear
from megatron_fp4.recipe import QuantContext
from megatron_fp4.registry import load_recipe
from megatron_fp4.rng import RandomStream, Role, derive_key, random_signs
from megatron_fp4.tensor import NVFP4Tensor

QUANTIZED = ["nvidia", "nvidia-46", "tetrajet2", "quartet2", "quartet2-no46", "quartet2-kernel"]


def data(t=256, k=256, n=384, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype) * 0.05
    dy = torch.randn(t, n, generator=g).to(dtype)
    return x, w, dy


def run(recipe, x, w, dy, key=5, bias=None):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    y = nvfp4_linear(x, w, bias, recipe, QuantContext(key=key, seed=recipe.seed))
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def expected_forward_operands(name, x, w):
    """The forward operands straight from the spec's per-recipe table (numerics.md §6)."""
    if name in ("quartet2", "quartet2-kernel"):
        kw = dict(smax=256.0, four_over_six=True)
        return Q.quantize_nvfp4(x, **kw), Q.quantize_nvfp4(w, **kw)
    if name == "quartet2-no46":
        return Q.quantize_nvfp4(x), Q.quantize_nvfp4(w)
    if name == "nvidia":
        return Q.quantize_nvfp4(x), Q.quantize_nvfp4(w, block_rows=16)
    if name == "nvidia-46":
        kw = dict(smax=256.0, four_over_six=True)
        return Q.quantize_nvfp4(x, **kw), Q.quantize_nvfp4(w, block_rows=16, **kw)
    if name == "tetrajet2":
        return Q.quantize_double_block(x), Q.quantize_double_block(w)
    raise KeyError(name)


@pytest.mark.parametrize("name", QUANTIZED)
def test_forward_is_the_exact_product_of_the_tables_operands(name):
    recipe = load_recipe(name)
    x, w, dy = data()
    y, _, _ = run(recipe, x, w, dy)
    xq, wq = expected_forward_operands(name, x, w)
    reference = xq.dequantize().double() @ wq.dequantize().double().t()
    # FP32 accumulation over K=256 of exact products: |err| <= K * 2^-24 * sum|a||b| (loose bound)
    bound = 256 * 2.0 ** -24 * (xq.dequantize().abs().double() @ wq.dequantize().abs().double().t()) + 1e-30
    assert ((y.double() - reference).abs() <= bound).all()


def test_quartet2_backward_follows_the_table():
    """dgrad and wgrad of quartet2 rebuilt from primitives: MS-EDEN after one shared RHT-128 sigma;
    W^T and X^T re-quantized from the forward-quantized operands."""
    recipe = load_recipe("quartet2")
    x, w, dy = data()
    key = 77
    _, dx, dw = run(recipe, x, w, dy, key=key)
    xq, wq = expected_forward_operands("quartet2", x, w)
    sigma = random_signs(derive_key(key, int(Role.RHT_SIGNS)), 128)

    def eden(t, role, row_offset=0):
        return Q.quantize_ms_eden(rht(t, sigma), stream=RandomStream(derive_key(key, int(role)), row_offset, 0))

    e_q = eden(dy, Role.DGRAD_GRAD_OUTPUT)
    wt_q = eden(wq.dequantize_unscaled().t(), Role.DGRAD_WEIGHT)
    dx_ref = e_q.dequantize().double() @ wt_q.dequantize().double().t() * wq.tensor_scale.double()
    et_q = eden(dy.t(), Role.WGRAD_GRAD_OUTPUT)
    xt_q = eden(xq.dequantize_unscaled().t(), Role.WGRAD_INPUT)
    dw_ref = et_q.dequantize().double() @ xt_q.dequantize().double().t() * xq.tensor_scale.double()
    torch.testing.assert_close(dx.double(), dx_ref, rtol=1e-5, atol=1e-6 * dx_ref.abs().max().item())
    torch.testing.assert_close(dw.double(), dw_ref, rtol=1e-5, atol=1e-6 * dw_ref.abs().max().item())


def test_tetrajet2_backward_follows_the_table():
    """dgrad and wgrad of tetrajet2 rebuilt from primitives (numerics.md §6.2): Q3/Q4 = QDB SR after
    RHT-16 with d1 on E and on dequant(Q2(W))^T; Q5/Q6 = QDB SR after RHT-16 with a separate d2 on E^T
    and dequant(Q1(X))^T, along T. No headroom (official TetraJet-v2); double-block GEMM in float64."""
    recipe = load_recipe("tetrajet2")
    x, w, dy = data()
    key = 91
    _, dx, dw = run(recipe, x, w, dy, key=key)
    xq, wq = expected_forward_operands("tetrajet2", x, w)
    d1 = random_signs(derive_key(key, int(Role.RHT_SIGNS_DGRAD)), 16)
    d2 = random_signs(derive_key(key, int(Role.RHT_SIGNS_WGRAD)), 16)
    assert not torch.equal(d1, d2)

    def qdb_sr(t, signs, role):
        return Q.quantize_double_block(rht(t, signs), mode="sr", stream=RandomStream(derive_key(key, int(role))))

    e_q = qdb_sr(dy, d1, Role.DGRAD_GRAD_OUTPUT)
    wt_q = qdb_sr(wq.dequantize().t(), d1, Role.DGRAD_WEIGHT)
    dx_ref = e_q.dequantize().double() @ wt_q.dequantize().double().t()
    et_q = qdb_sr(dy.t(), d2, Role.WGRAD_GRAD_OUTPUT)
    xt_q = qdb_sr(xq.dequantize().t(), d2, Role.WGRAD_INPUT)
    dw_ref = et_q.dequantize().double() @ xt_q.dequantize().double().t()
    torch.testing.assert_close(dx.double(), dx_ref, rtol=1e-5, atol=1e-6 * dx_ref.abs().max().item())
    torch.testing.assert_close(dw.double(), dw_ref, rtol=1e-5, atol=1e-6 * dw_ref.abs().max().item())


def test_nvidia_wgrad_follows_the_table():
    """NVIDIA wgrad: E^T by SR (headroom 17/16) and the original X^T by RN, both after RHT-16 with the
    fixed signs, along T."""
    recipe = load_recipe("nvidia")
    x, w, dy = data()
    key = 4
    _, _, dw = run(recipe, x, w, dy, key=key)
    sigma = random_signs(derive_key(recipe.seed, int(Role.RHT_SIGNS_FIXED)), 16)
    et_q = Q.quantize_nvfp4(rht(dy.t(), sigma), mode="sr", v=6 * 16 / 17,
                            stream=RandomStream(derive_key(key, int(Role.WGRAD_GRAD_OUTPUT))))
    xt_q = Q.quantize_nvfp4(rht(x.t(), sigma))
    dw_ref = et_q.dequantize().double() @ xt_q.dequantize().double().t()
    torch.testing.assert_close(dw.double(), dw_ref, rtol=1e-5, atol=1e-6 * dw_ref.abs().max().item())


def test_nvidia_dgrad_reuses_forward_weight_tiles():
    """NVIDIA dgrad: E by SR (1x16, headroom 17/16) times the *forward* 16x16-tile W, no re-quantization."""
    recipe = load_recipe("nvidia")
    x, w, dy = data()
    key = 3
    _, dx, _ = run(recipe, x, w, dy, key=key)
    _, wq = expected_forward_operands("nvidia", x, w)
    e_q = Q.quantize_nvfp4(dy, mode="sr", v=6 * 16 / 17,
                           stream=RandomStream(derive_key(key, int(Role.DGRAD_GRAD_OUTPUT))))
    dx_ref = e_q.dequantize().double() @ wq.dequantize().double()
    torch.testing.assert_close(dx.double(), dx_ref, rtol=1e-5, atol=1e-6 * dx_ref.abs().max().item())


def test_saved_operands_are_packed():
    """The forward saves NVFP4 operands (about 4.5 bits per element), not BF16 copies."""
    recipe = load_recipe("quartet2")
    x, w, _ = data()
    x = x.to(torch.bfloat16).requires_grad_(True)
    w = w.to(torch.bfloat16).requires_grad_(True)
    y = nvfp4_linear(x, w, None, recipe)
    node = y.grad_fn
    while node is not None and type(node).__name__ != "NVFP4LinearFunctionBackward":
        node = node.next_functions[0][0]
    assert node is not None
    assert isinstance(node.x_saved, NVFP4Tensor) and isinstance(node.wq, NVFP4Tensor)
    bits_per_element = 8 * node.x_saved.nbytes() / x.numel()
    assert 4.5 <= bits_per_element <= 4.6
    assert node.x_saved.packed.dtype == torch.uint8


@pytest.mark.parametrize("name", ["quartet2", "tetrajet2", "nvidia"])
def test_token_padding_equals_explicit_zero_rows(name):
    """T = 200 is padded internally; the result equals running with 56 explicit zero rows appended
    (zeros change no amax, the random counters of the real rows are unchanged)."""
    recipe = load_recipe(name)
    x, w, dy = data(t=200)
    y, dx, dw = run(recipe, x, w, dy)
    zeros_x, zeros_dy = torch.zeros(56, x.shape[1]), torch.zeros(56, dy.shape[1])
    y2, dx2, dw2 = run(recipe, torch.cat([x, zeros_x]), w, torch.cat([dy, zeros_dy]))
    assert torch.equal(y, y2[:200]) and torch.equal(dx, dx2[:200])
    torch.testing.assert_close(dw, dw2, rtol=0, atol=0)


def test_leading_dims_are_flattened():
    recipe = load_recipe("quartet2")
    x, w, dy = data(t=256)
    y, dx, dw = run(recipe, x, w, dy)
    y3, dx3, dw3 = run(recipe, x.reshape(2, 128, -1), w, dy.reshape(2, 128, -1))
    assert torch.equal(y3.reshape(256, -1), y) and torch.equal(dx3.reshape(256, -1), dx)
    assert torch.equal(dw3, dw)


@pytest.mark.parametrize("name", QUANTIZED)
def test_same_key_same_bits_other_key_other_bits(name):
    recipe = load_recipe(name)
    x, w, dy = data()
    a = run(recipe, x, w, dy, key=1)
    b = run(recipe, x, w, dy, key=1)
    c = run(recipe, x, w, dy, key=2)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[2], c[2])


def test_bias_and_dtypes():
    recipe = load_recipe("quartet2")
    x, w, dy = data(dtype=torch.bfloat16)
    bias = torch.randn(w.shape[0], dtype=torch.bfloat16, requires_grad=True)
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    y = nvfp4_linear(xr, wr, bias, recipe)
    y.backward(dy)
    assert y.dtype == xr.grad.dtype == wr.grad.dtype == torch.bfloat16
    assert torch.equal(bias.grad, dy.float().sum(0).to(torch.bfloat16))
    no_bias = nvfp4_linear(x, w, None, recipe)
    assert torch.equal(y.detach(), (no_bias + bias.detach()))


def test_wgrad_accumulates_into_main_grad():
    recipe = load_recipe("quartet2")
    x, w, dy = data()
    plain = run(recipe, x, w, dy, key=9)[2]
    w = w.clone().requires_grad_(True)
    w.main_grad = torch.ones_like(w, dtype=torch.float32)
    y = nvfp4_linear(x, w, None, recipe, QuantContext(key=9, seed=recipe.seed), accumulate_into_main_grad=True)
    y.backward(dy)
    assert w.grad is None and w.grad_added_to_main_grad
    torch.testing.assert_close(w.main_grad, plain + 1)


def test_bf16_recipe_is_plain_linear():
    recipe = load_recipe("bf16")
    x, w, dy = data()
    assert torch.equal(nvfp4_linear(x, w, None, recipe), torch.nn.functional.linear(x, w))


def test_bad_input_errors():
    recipe = load_recipe("quartet2")
    x, w, _ = data()
    with pytest.raises(ValueError, match="features"):
        nvfp4_linear(x[:, :128], w, None, recipe)
    with pytest.raises(ValueError, match="empty"):
        nvfp4_linear(x[:0], w, None, recipe)
    with pytest.raises(ValueError, match="out_features"):
        nvfp4_linear(x, w[:100], None, recipe)
    with pytest.raises(TypeError, match="float"):
        nvfp4_linear(x.to(torch.int32), w, None, recipe)


@pytest.mark.parametrize("name", ["quartet2", "tetrajet2", "nvidia"])
def test_nan_propagates_to_the_output(name):
    recipe = load_recipe(name)
    x, w, dy = data()
    x[3, 7] = float("nan")
    y = nvfp4_linear(x, w, None, recipe)
    assert torch.isnan(y).any()


def test_debug_checks_raise_on_nonfinite():
    recipe = load_recipe("quartet2", {"debug_checks": True})
    x, w, _ = data()
    x[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="forward output"):
        nvfp4_linear(x, w, None, recipe)


@pytest.mark.parametrize("name", QUANTIZED)
def test_module_trains_a_regression(name):
    """A 2-layer model learns a random linear map (initial loss ~1). FP4 training must reach the
    floor set by forward quantization noise (~2-3e-2 here: ~1% relMSE per operand, four operands)."""
    def train(recipe_name):
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        target = torch.randn(128, 128, generator=g) / 128 ** 0.5
        model = torch.nn.Sequential(NVFP4Linear(128, 256, recipe=recipe_name, layer_id=0),
                                    NVFP4Linear(256, 128, recipe=recipe_name, layer_id=1))
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        losses = []
        for step in range(60):
            x = torch.randn(256, 128, generator=g)
            loss = ((model(x) - x @ target) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses
    fp4, bf16 = train(name), train("bf16")
    assert fp4[0] > 0.5 and bf16[-1] < 0.01
    assert fp4[-1] < 0.04, fp4[-1]
