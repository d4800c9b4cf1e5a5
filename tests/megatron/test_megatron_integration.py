"""Megatron-Core integration on CPU: real gloo process groups (2 ranks), real megatron-core classes.

Rank bodies live in mfp4_workers.py; megatron_fp4.testing.dist runs them on forkserver processes
with megatron.core preloaded and the CPU shim installed, each run under a timeout.
"""
import math

import pytest

import mfp4_workers as w
from megatron_fp4.testing import dist

pytestmark = pytest.mark.timeout(300)

SMALL = dict(num_layers=2, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4, seq_length=64,
             micro_batch_size=2, num_microbatches=2)


def test_fp4_allgather_is_bit_identical_to_gather_then_quantize():
    res = dist.run(w.fp4_allgather_identity, 2, timeout=120)
    for rank_res in res:
        for name, (same, fp4_bytes, bf16_bytes) in rank_res.items():
            assert same, f"{name}: quantize-then-gather differs from gather-then-quantize"
            assert fp4_bytes < 0.32 * bf16_bytes, (name, fp4_bytes, bf16_bytes)


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2sp"])
@pytest.mark.parametrize("recipe", w.RECIPES)
def test_layers_tp2_match_single_device(recipe, sp):
    for r in dist.run(w.layer_parity, 2, recipe, sp, timeout=120):
        if recipe != "bf16":
            # column-parallel forward sees the full K: bit-identical; row-parallel dgrad likewise
            assert r["col_fwd_bitexact"], r
            assert r["row_dx_bitexact"], r
        else:
            assert r["col_fwd_maxdiff"] <= 1e-5, r
        tol = 1e-5   # FP32 reduction order (TP partial sums) only
        assert r["col_dx_maxdiff"] <= tol * r["col_dx_scale"], r
        assert r["col_dw_maxdiff"] <= tol * r["col_dw_scale"], r
        assert r["col_db_maxdiff"] <= 1e-5, r
        assert r["row_fwd_maxdiff"] <= tol * r["row_fwd_scale"], r
        assert r["row_dx_maxdiff"] <= tol * r["row_dx_scale"], r
        assert r["row_dw_maxdiff"] <= tol * r["row_dw_scale"], r


@pytest.mark.parametrize("recipe", ["nvidia", "tetrajet2", "quartet2"])
def test_layers_tp2_sp_kernel_path_match_single_device(recipe):
    """The same parity as above with every quantizer, GEMM operand and epilogue on the kernel path
    (Triton's interpreter on CPU, MEGATRON_FP4_KERNELS=interpret): quantize-before-gather, packed
    all-gathers, the operands the quantizers write for their GEMMs, and the kernels' random counters
    at each rank's global offsets."""
    env = {"MEGATRON_FP4_KERNELS": "interpret"}   # TRITON_INTERPRET=1 comes from conftest.py
    for r in dist.run(w.with_env, 2, env, "layer_parity", recipe, True, timeout=240):
        assert r["col_fwd_bitexact"], r
        assert r["row_dx_bitexact"], r
        tol = 1e-5
        for part in ("col_dx", "col_dw", "row_fwd", "row_dx", "row_dw"):
            assert r[f"{part}_maxdiff"] <= tol * r[f"{part}_scale"], (part, r)


@pytest.mark.parametrize("recipe", ["quartet2", "bf16"])
def test_gradient_accumulation_fusion_into_main_grad(recipe):
    for r in dist.run(w.fusion_main_grad, 2, recipe, timeout=120):
        assert r["added"] and r["placeholder"], r
        assert r["diff"] <= 1e-5 * max(1.0, r["scale"]), r


def _train(world, steps, **kw):
    return dist.run(w.gpt_train, world, dict(SMALL, **kw), steps, timeout=240)


def _assert_same_training(ref, other, later_loss_tol):
    """Step 1 sees identical weights: its loss and gradients differ by FP32 reduction order only (the
    randomness does not depend on the split), which carries the claim. After an update the weights
    differ in their last bits and FP4 rounding amplifies that: scaling every initial weight of the
    TP=1 quartet2 run by (1 + 2^-22) moves its step-3 grad norm by 9e-4 relative and step 4 by 9e-3
    (benchmarks/fp4_perturbation.py, docs/RESULTS.md), so later steps are held to that scale, not to
    reduction order."""
    assert math.isclose(ref["losses"][0], other["losses"][0], rel_tol=1e-6), (ref["losses"], other["losses"])
    assert math.isclose(ref["grad_norms"][0], other["grad_norms"][0], rel_tol=1e-5), (
        ref["grad_norms"], other["grad_norms"])
    for a, b in zip(ref["losses"][1:], other["losses"][1:]):
        assert math.isclose(a, b, rel_tol=later_loss_tol), (ref["losses"], other["losses"])
    for a, b in zip(ref["grad_norms"][1:], other["grad_norms"][1:]):
        assert math.isclose(a, b, rel_tol=1e-2), (ref["grad_norms"], other["grad_norms"])


def test_gpt_tp2_sp_matches_tp1_quartet2():
    ref = _train(1, 3, recipe="quartet2")[0]
    tp2 = _train(2, 3, recipe="quartet2", tp=2)[0]
    sp = _train(2, 3, recipe="quartet2", tp=2, sequence_parallel=True)
    for other in (tp2, sp[0], sp[1]):
        _assert_same_training(ref, other, later_loss_tol=1e-4)
    comm = sp[0]["comm"]
    assert comm and all(q < 0.32 * b for q, b in comm.values()), comm


@pytest.mark.parametrize("recipe", ["quartet2", "tetrajet2", "nvidia"])
def test_swiglu_fc1_tp2_draws_the_tp1_bits(recipe):
    """SwiGLU's fc1 (partition stride 2) holds two strided shards per rank (gate, up); its random
    counters follow them (rng.TwoPieces), so each TP=2 rank computes exactly its rows of the TP=1
    result: forward bit-exact, dW bit-exact, dX to FP32 reduction order."""
    for r in dist.run(w.swiglu_fc1_parity, 2, recipe, timeout=120):
        assert r["fwd_bitexact"] and r["weights_match"], r
        assert r["dw_maxdiff"] == 0.0, r
        assert r["dx_maxdiff"] <= 1e-6 * r["dx_scale"], r


@pytest.mark.parametrize("recipe", ["quartet2", "tetrajet2", "nvidia"])
def test_gpt_swiglu_tp2_matches_tp1(recipe):
    """The SwiGLU GPT at TP=2 trains as at TP=1 (without the two-piece counters the grad norms differ by
    ~1e-3 here). One layer: with more, the FP32 reduction order of the TP partial sums reaches the
    next quantizer's amax, and a one-ulp amax change moves scales and SR thresholds, which the
    comparison would then measure instead of the draws (seen: 8e-4 at 2 layers x 2 micro-batches)."""
    one_layer = dict(num_layers=1, swiglu=True)
    ref = _train(1, 3, recipe=recipe, **one_layer)[0]
    tp2 = _train(2, 3, recipe=recipe, tp=2, sequence_parallel=True, **one_layer)[0]
    _assert_same_training(ref, tp2, later_loss_tol=1e-3)


@pytest.mark.parametrize("recipe", w.RECIPES)
def test_gpt_trains_tp2_sp(recipe):
    res = _train(2, 6, recipe=recipe, tp=2, sequence_parallel=True)
    losses = res[0]["losses"]
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0] - 0.2, losses
    assert res[0]["losses"] == res[1]["losses"]


@pytest.mark.parametrize("recipe", w.RECIPES)
def test_gpt_trains_pp2(recipe):
    res = _train(2, 5, recipe=recipe, num_layers=4, pp=2, num_microbatches=4)
    losses = res[0]["losses"]
    assert losses == res[1]["losses"] and losses[-1] < losses[0] - 0.2, losses


@pytest.mark.parametrize("recipe", w.RECIPES)
def test_gpt_trains_pp2_virtual_stages(recipe):
    res = _train(2, 5, recipe=recipe, num_layers=4, pp=2, vpp=2, num_microbatches=4)
    losses = res[0]["losses"]
    assert losses == res[1]["losses"] and losses[-1] < losses[0] - 0.2, losses


@pytest.mark.parametrize("recipe", w.RECIPES)
def test_gpt_trains_dp2_distributed_optimizer(recipe):
    res = _train(2, 5, recipe=recipe, use_distributed_optimizer=True)
    for r in res:
        assert r["losses"][-1] < r["losses"][0] - 0.2, r["losses"]
    # replicas must stay in sync: identical grad norms (all-reduced) on both DP ranks
    assert res[0]["grad_norms"] == res[1]["grad_norms"]


def test_overlapped_grad_reduce_gives_the_same_training():
    """--overlap-grad-reduce (each bucket reduce-scattered as soon as the plugin's backward completes
    it) changes when the reductions run, not what they sum: the same losses and grad norms."""
    plain = _train(2, 3, recipe="quartet2", use_distributed_optimizer=True)[0]
    overlapped = _train(2, 3, recipe="quartet2", use_distributed_optimizer=True, overlap_grad_reduce=True)[0]
    assert overlapped["overlap_grad_reduce"] and not plain["overlap_grad_reduce"]
    assert plain["losses"] == overlapped["losses"] and plain["grad_norms"] == overlapped["grad_norms"]


def test_checkpoint_saved_at_tp2_loads_at_tp1(tmp_path):
    (tmp_path / "ckpt").mkdir()
    saved = dist.run(w.checkpoint_save, 2, dict(SMALL, recipe="quartet2", tp=2, sequence_parallel=True),
                     str(tmp_path / "ckpt"), 3, timeout=240)[0]
    loaded = dist.run(w.checkpoint_load, 1, dict(SMALL, recipe="quartet2", tp=1), str(tmp_path / "ckpt"), 3,
                      timeout=240)[0]
    assert math.isclose(saved["eval_loss"], loaded["eval_loss"], rel_tol=1e-5), (saved, loaded)
    # and training continues with the same loss: iteration 3's loss (before its update) at TP=1 from the
    # checkpoint equals the TP=2 run's own iteration 3
    assert math.isclose(saved["next_loss"], loaded["next_loss"], rel_tol=1e-5), (saved, loaded)


@pytest.mark.slow
def test_recompute_gives_the_same_training():
    plain = _train(2, 3, recipe="quartet2", tp=2, sequence_parallel=True)[0]
    recomputed = _train(2, 3, recipe="quartet2", tp=2, sequence_parallel=True, recompute=True)[0]
    assert plain["losses"] == recomputed["losses"], (plain["losses"], recomputed["losses"])
