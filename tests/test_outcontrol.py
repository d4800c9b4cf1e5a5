"""OutControl: outlier count and selection, exact channel split, and the split GEMMs against float64
references built from the quantizers (NVFP4 on the FP4 channels + MXFP8 on the outliers)."""
import pytest
import torch

from megatron_fp4 import quantizers as Q
from megatron_fp4.linear import nvfp4_linear
from megatron_fp4.outcontrol import ChannelSplit, ColumnNormRecorder, outlier_count, select_outliers
from megatron_fp4.recipe import QuantContext
from megatron_fp4.registry import load_recipe


@pytest.mark.parametrize("k, exact, release", [
    (512, 51, 128), (1024, 102, 128), (768, 77, 128), (1536, 154, 256), (4096, 410, 512), (128, 13, 128)])
def test_outlier_count_both_modes(k, exact, release):
    """release128 reproduces the spec's table (70M/150M/370M, ratio 0.1)."""
    assert outlier_count(k, 0.1, "exact") == exact
    assert outlier_count(k, 0.1, "release128") == release
    with pytest.raises(ValueError):
        outlier_count(k, 0.1, "other")


def test_selection_is_top_k_with_lower_index_ties():
    g = torch.Generator().manual_seed(0)
    sums = torch.randint(0, 20, (300,), generator=g).float()  # many ties
    for count in (0, 1, 17, 64, 300):
        mask = select_outliers(sums, count)
        brute = sorted(range(300), key=lambda i: (-sums[i].item(), i))[:count]
        assert mask.sum() == count and set(mask.nonzero().squeeze(1).tolist()) == set(brute)


def test_recorder_sums_per_micro_batch_norms():
    rec = ColumnNormRecorder(4)
    a, b = torch.randn(10, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    rec.record(a)
    rec.record(b)
    expected = a.pow(2).sum(0).sqrt() + b.pow(2).sum(0).sqrt()
    assert torch.allclose(rec.sums.double(), expected, rtol=1e-6)
    assert rec.micro_batches == 2


def make_split(k=384, outliers=(3, 50, 51, 200, 383)):
    mask = torch.zeros(k, dtype=torch.bool)
    mask[list(outliers)] = True
    return ChannelSplit.from_mask(mask)


def test_gather_scatter_padding_is_exact():
    """Unquantized: the split GEMM (padded parts) equals the unsplit GEMM; scatter inverts gather."""
    split = make_split()
    x = torch.randn(64, 384, dtype=torch.float64)
    w = torch.randn(96, 384, dtype=torch.float64)
    xf, xo = split.gather(x)
    wf, wo = split.gather(w)
    assert xf.shape[1] % 128 == 0 and xo.shape[1] % 32 == 0
    torch.testing.assert_close(xf @ wf.t() + xo @ wo.t(), x @ w.t(), rtol=1e-12, atol=1e-12)
    assert torch.equal(split.scatter(xf, xo), x)


def layer(t=256, k=384, n=256, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g)
    x[:, [3, 50, 51, 200, 383]] *= 30  # the outlier channels
    w = torch.randn(n, k, generator=g) * 0.05
    dy = torch.randn(t, n, generator=g)
    return x, w, dy


@pytest.mark.parametrize("name", ["tetrajet2", "quartet2"])
def test_split_forward_equals_float64_reference(name):
    recipe = load_recipe(name)
    split = make_split()
    x, w, _ = layer()
    y = nvfp4_linear(x, w, None, recipe, QuantContext(seed=1), split=split)
    xf, xo = split.gather(x)
    wf, wo = split.gather(w)
    ref = (recipe.quantize_input(xf, QuantContext()).dequantize().double()
           @ recipe.quantize_weight(wf, QuantContext()).dequantize().double().t()
           + Q.quantize_mxfp8(xo).dequantize().double() @ Q.quantize_mxfp8(wo).dequantize().double().t())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_split_backward_follows_the_table():
    recipe = load_recipe("tetrajet2")
    split = make_split()
    x, w, dy = layer()
    key = 12
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    nvfp4_linear(xr, wr, None, recipe, QuantContext(key=key, seed=1), split=split).backward(dy)
    ctx = QuantContext(key=key, seed=1)
    xf, xo = split.gather(x)
    wf, wo = split.gather(w)
    # dgrad: all FP4, from W_hat rebuilt from the FP4 part's QDB dequant and the outliers' MXFP8 dequant
    w_hat = torch.zeros_like(w)
    w_hat[:, split.fp4_index] = Q.quantize_double_block(wf).dequantize()[:, : split.fp4_index.numel()]
    w_hat[:, split.outlier_index] = Q.quantize_mxfp8(wo).dequantize()[:, : split.outlier_index.numel()]
    assert torch.equal(xr.grad, recipe.dgrad_dense(dy, w_hat, ctx))
    # wgrad outlier columns: MXFP8(dY^T along T) x MXFP8(dequantized forward MXFP8 X_out, along T)
    xo_hat = Q.quantize_mxfp8(xo).dequantize()
    ref = (Q.quantize_mxfp8(dy.t().contiguous()).dequantize().double()
           @ Q.quantize_mxfp8(xo_hat.t().contiguous()).dequantize().double().t())
    got = wr.grad[:, split.outlier_index]
    torch.testing.assert_close(got.double(), ref[:, : split.outlier_index.numel()], rtol=1e-5, atol=1e-4)
    # wgrad FP4 columns: the recipe's wgrad on the gathered FP4 part
    dw_fp4 = recipe.wgrad(dy, recipe.quantize_input(xf, ctx), ctx)
    assert torch.equal(wr.grad[:, split.fp4_index], dw_fp4[:, : split.fp4_index.numel()])


def test_outliers_reduce_forward_error():
    """With large-norm channels, keeping them in MXFP8 lowers the forward error (the point of OutControl)."""
    recipe = load_recipe("tetrajet2")
    x, w, _ = layer()
    exact = x.double() @ w.double().t()
    err_plain = (nvfp4_linear(x, w, None, recipe).double() - exact).norm()
    err_split = (nvfp4_linear(x, w, None, recipe, split=make_split()).double() - exact).norm()
    assert err_split < 0.9 * err_plain


def test_split_needs_a_requantizing_recipe():
    x, w, _ = layer()
    with pytest.raises(ValueError, match="OutControl"):
        nvfp4_linear(x, w, None, load_recipe("nvidia"), split=make_split())
    with pytest.raises(ValueError, match="channels"):
        nvfp4_linear(x, w, None, load_recipe("tetrajet2"), split=make_split(k=256, outliers=(1,)))
