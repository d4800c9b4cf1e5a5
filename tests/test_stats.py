"""Quantization statistics (megatron_fp4/stats.py) against float64 brute force on small tensors: the
E4M3 grid by enumeration, the Hadamard matrix by Sylvester's construction, S = sum u^2 / sum u q."""
import math

import numpy as np
import pytest
import torch

from megatron_fp4 import stats
from megatron_fp4.kernels import dispatch as D
from megatron_fp4.rng import RandomStream

E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
# every finite non-negative E4M3 value, by enumerating the 8-bit codes (0x7F is NaN)
E4M3 = np.array(sorted({float(v) for v in torch.arange(0, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()}))


@pytest.fixture(autouse=True)
def _stats_off():
    stats.set_layer(None)
    yield
    stats.configure(0)
    stats.set_layer(None)


def _collect(fn, layer="L"):
    """Run fn() as one statistics iteration of `layer`; return (records by operand, first non-finite)."""
    stats.configure(1)
    stats.on_iteration(1)
    stats.set_layer(layer)
    out = fn()
    records, bad = stats.collect(1)
    return out, {r["operand"]: r for r in records}, bad


def _decode64(q):
    """Represented values of an NVFP4Tensor in float64 from its raw fields (1x16 blocks)."""
    packed = q.packed.numpy().astype(np.int64)
    codes = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(packed.shape[0], -1)
    mag = E2M1[codes & 7] * np.where(codes & 8, -1.0, 1.0)
    scales = np.repeat(q.block_scales.float().numpy().astype(np.float64), 16, axis=1)
    out = mag * scales
    if q.outer_scales is not None:
        out = out * np.repeat(q.outer_scales.numpy().astype(np.float64), 128, axis=1)
    if q.tensor_scale is not None:
        out = out * float(q.tensor_scale)
    return out, mag


def _e4m3_rn(t):
    """RN to E4M3, ties to the even code, saturating at 448 (by enumeration)."""
    t = min(t, 448.0)
    i = int(np.argmin(np.abs(E4M3 - t)))
    d = abs(E4M3[i] - t)
    ties = [j for j in range(len(E4M3)) if abs(E4M3[j] - t) == d]
    return E4M3[ties[0]] if len(ties) == 1 else E4M3[[j for j in ties if j % 2 == 0][0]]


def _hadamard64(n):
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / math.sqrt(n)


def test_saturated_flushed_and_zero_blocks_against_brute_force():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 64, generator=gen) * 0.5 + 0.25      # block amaxes in [0.25, 0.75]
    x[1, 16:32] = 0.0                                      # exact zero block: not flushed
    x[2, 32:48] = 1e-9                                     # tiny block: its scale rounds to 0
    x[3, 0] = 1000.0                                       # one huge value: the tensor amax's block
    xq, rec, bad = _collect(lambda: D.quantize_nvfp4(x, smax=448.0, site=("t", "forward X")))
    assert bad is None
    r = rec["fprop X"]
    x64 = x.double().numpy()
    amax = np.abs(x64).max()
    g = amax / (448.0 * 6.0)
    blocks = np.abs(x64).reshape(4, 4, 16).max(axis=2)
    scales = np.array([[_e4m3_rn(b / 6.0 / g) for b in row] for row in blocks])
    assert np.array_equal(scales, xq.block_scales.float().numpy())   # the brute force agrees with the quantizer
    assert r["saturated_fraction"] == (scales == 448.0).sum() / 16 == 1 / 16
    assert r["flushed_fraction"] == ((scales == 0) & (blocks > 0)).sum() / 16 == 1 / 16
    assert r["amax"] == amax
    deq, _ = _decode64(xq)
    rows = list(stats.sample_rows(4))
    assert rows == [0, 1, 2, 3]
    want = np.linalg.norm(deq[rows] - x64[rows]) / np.linalg.norm(x64[rows])
    assert r["rel_error"] == pytest.approx(want, rel=1e-6)   # the code dequantizes in FP32
    assert r["eden_correction_min"] is None and r["clamped_fraction"] is None


def test_sampled_rows_relative_error_of_a_double_block_operand():
    x = torch.randn(40, 256, generator=torch.Generator().manual_seed(1))
    xq, rec, _ = _collect(lambda: D.quantize_double_block(x, site=("t", "forward W")))
    rows = list(stats.sample_rows(40))
    assert rows == [0, 6, 11, 17, 22, 28, 33, 39]
    deq, _ = _decode64(xq)
    x64 = x.double().numpy()
    r = rec["fprop W"]
    assert r["rel_error"] == pytest.approx(np.linalg.norm(deq[rows] - x64[rows]) / np.linalg.norm(x64[rows]), rel=1e-6)
    # the block holding each 128-block's maximum sits at 448 (numerics.md §3.4)
    assert r["saturated_fraction"] == (xq.block_scales.float().numpy() == 448.0).mean() >= 1 / 8


@pytest.mark.parametrize("eden_group", [128, 16])
@pytest.mark.parametrize("transpose", [False, True])
def test_ms_eden_correction_range_and_error_against_float64(eden_group, transpose):
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(128, 256, generator=gen) * torch.linspace(0.1, 3.0, 256)
    sigma = torch.where(torch.rand(128, generator=gen) < 0.5, -1.0, 1.0)
    v = 6.0 / (17 / 16 * 0.93)
    q, rec, _ = _collect(lambda: D.rht_ms_eden(a, sigma, RandomStream(7), transpose=transpose, eden_group=eden_group,
                                               v=v, site=("t", "wgrad E^T" if transpose else "dgrad E")))
    r = rec["wgrad E^T" if transpose else "dgrad E"]
    A = a.double().numpy().T if transpose else a.double().numpy()
    rows = list(stats.sample_rows(A.shape[0]))
    h = _hadamard64(128)
    z = (A[rows].reshape(len(rows), -1, 128) * sigma.double().numpy()) @ h
    z = z.reshape(len(rows), -1)
    deq, codes = _decode64(q)
    codes = codes[rows]
    blocks = np.abs(z).reshape(len(rows), -1, 16).max(axis=2)
    if eden_group == 128:
        g = float(q.tensor_scale)
        s = np.vectorize(lambda b: _e4m3_rn(b / v / g))(blocks) * g
    else:    # §5.3: the block max / v with its mantissa truncated to 4 bits
        m, e = np.frexp(blocks / v)
        s = np.floor(m * 32) / 32 * 2.0 ** e
    u = z.reshape(len(rows), -1, 16) / s[..., None]
    per = eden_group // 16
    u = u.reshape(len(rows), -1, per * 16)
    qq = codes.reshape(len(rows), -1, per * 16)
    factors = (u * u).sum(axis=2) / (u * qq).sum(axis=2)
    assert r["eden_correction_min"] == pytest.approx(factors.min(), rel=1e-4)
    assert r["eden_correction_max"] == pytest.approx(factors.max(), rel=1e-4)
    assert 0.5 < r["eden_correction_min"] <= r["eden_correction_max"] < 2.0
    assert r["rel_error"] == pytest.approx(np.linalg.norm(deq[rows] - z) / np.linalg.norm(z), rel=1e-5)
    assert r["amax"] == pytest.approx(float(np.abs(a.double().numpy()).max()), rel=0)
    assert r["clamped_fraction"] == 0.0


def test_nonfinite_source_is_named_and_collection_only_on_its_iterations():
    x = torch.randn(32, 128, generator=torch.Generator().manual_seed(3))
    w = torch.randn(128, 128, generator=torch.Generator().manual_seed(4))
    x[5, 7] = float("inf")

    def two_operands():
        stats.set_layer("layer.a")
        D.quantize_nvfp4(w, site=("t", "forward W"))
        stats.set_layer("layer.b")
        D.quantize_nvfp4(x, site=("t", "forward X"))
        D.quantize_nvfp4(x * float("nan"), site=("t", "dgrad E"))

    _, rec, bad = _collect(two_operands)
    assert bad == ("layer.b", "fprop X") and math.isinf(rec["fprop X"]["amax"])
    # interval 2: iterations 1 and 3 observe nothing, 2 and 4 everything, each collected once
    stats.configure(2)
    for it in (1, 2, 3, 4):
        stats.on_iteration(it)
        two_operands()
        result = stats.collect(it)
        assert (result is None) == (it % 2 == 1)
        if result is not None:
            assert [(r["layer"], r["operand"]) for r in result[0]] == [("layer.a", "fprop W"), ("layer.b", "fprop X"),
                                                                       ("layer.b", "dgrad E")]
            assert stats.collect(it) is None
    stats.on_iteration(4)           # e.g. the evaluation after the log line: not collected again
    assert not stats.active


def test_off_means_no_observation():
    stats.configure(0)
    stats.on_iteration(1)
    stats.set_layer("L")
    D.quantize_nvfp4(torch.ones(16, 16), site=("t", "forward X"))
    assert not stats.active and stats.collect(1) is None and stats._pending == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or __import__("os").environ.get("MEGATRON_FP4_TEST_GPU") != "1",
                    reason="needs a CUDA GPU and MEGATRON_FP4_TEST_GPU=1")
@pytest.mark.parametrize("recipe", ["quartet2", "nvidia", "tetrajet2"])
def test_a_statistics_iteration_does_not_sync_the_host(recipe):
    """Observing an operand queues device work only: no host sync until collect() (a sync per operand
    made a statistics iteration of the ~1B GPT cost 2-3 steps). Checked with torch's sync debug mode,
    which raises on a synchronising call; the second iteration, once the index tensors exist."""
    from megatron_fp4.linear import nvfp4_linear
    from megatron_fp4.recipe import QuantContext
    from megatron_fp4.registry import load_recipe
    from megatron_fp4.rng import derive_key
    rec = load_recipe(recipe)
    gen = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_(True)
    w = (torch.randn(384, 512, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.05).requires_grad_(True)
    dy = torch.randn(256, 384, device="cuda", dtype=torch.bfloat16, generator=gen)
    stats.configure(1)
    for it in (1, 2):
        stats.on_iteration(it)
        stats.set_layer("L")
        if it == 2:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            nvfp4_linear(x, w, None, rec, QuantContext(key=derive_key(1, it, 0, 0), seed=rec.seed)).backward(dy)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        records, bad = stats.collect(it)
        assert bad is None and len(records) == (5 if recipe == "nvidia" else 6)   # nvidia reuses its W tiles
        assert all(r["rel_error"] is not None and 0 < r["rel_error"] < 0.5 for r in records)


@pytest.mark.parametrize("kind", ["1x16", "16x16", "double-block", "nonfinite"])
def test_packed_column_values_and_amax_match_the_full_dequantization(kind):
    """The re-quantized operands' statistics read the packed operand without dequantizing it whole:
    the sampled columns and the amax equal the full dequantization's, bit for bit (scaled and
    unscaled; 16x16 tiles; double blocks with outer scales; a NaN source)."""
    from megatron_fp4 import quantizers as Q
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(64, 256, generator=gen) * torch.logspace(-3, 3, 64)[:, None]
    if kind == "nonfinite":
        x[5, 17] = float("nan")
    if kind == "double-block":
        q = Q.quantize_double_block(x)
    else:
        q = Q.quantize_nvfp4(x, block_rows=16 if kind == "16x16" else 1)
    idx = torch.tensor([0, 1, 15, 16, 17, 127, 128, 200, 255])
    for scaled in (True, False):
        full = q.dequantize() if scaled else q.dequantize_unscaled()
        torch.testing.assert_close(q.column_values(idx, scaled), full[:, idx], rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(q.represented_amax(scaled), full.abs().amax(), rtol=0, atol=0, equal_nan=True)
    assert math.isnan(q.represented_amax()) == (kind == "nonfinite")
