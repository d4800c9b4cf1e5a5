"""OsciReset and OutControl inside real Megatron-Core runs on CPU (gloo, real optimizers)."""
import math

import pytest

import stabilizer_workers as w
from megatron_fp4.testing import dist

pytestmark = pytest.mark.timeout(400)

SMALL = dict(num_layers=2, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4, seq_length=64,
             micro_batch_size=2, num_microbatches=2)
# a compressed schedule: record OutControl norms at iterations 2-3 (select at 4); OsciReset windows
# start at updates 4 and 8, reset at 7 and 11
SCHEDULE = {"outcontrol_record_start": 2.0, "outcontrol_record_iters": 2.0, "oscireset_start": 4.0,
            "oscireset_period": 4.0, "oscireset_window": 2.0}


@pytest.mark.parametrize("recipe", ["tetrajet2-full", "quartet2-plus"])
def test_gpt_trains_with_stabilizers(recipe):
    r = dist.run(w.train_with_stabilizers, 1,
                 dict(SMALL, recipe=recipe, recipe_overrides=dict(SCHEDULE, outcontrol_ratio=0.125),
                      train_steps=12), timeout=300)[0]
    losses = r["losses"]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.2, losses
    assert sorted({e["update"] for e in r["oscireset"]}) == [7, 11], r["oscireset"]
    for event in r["oscireset"]:
        assert 0 <= event["reset_fraction"] <= 1 and event["tracked"] == event["numel"]
    # every plugin linear (qkv, proj, fc1, fc2 of 2 layers) selected 1/8 of its input channels
    assert len(r["outcontrol"]) == 8, r["outcontrol"]
    for name, stats in r["outcontrol"].items():
        assert stats["outliers"] == round(0.125 * stats["channels"])
        assert stats["iteration"] == 4 and stats["micro_batches"] == 4
        # top-k of the recorded norms holds at least its proportional share
        assert stats["norm_share"] >= stats["outliers"] / stats["channels"], (name, stats)
        assert len(r["masks"][name]) == stats["outliers"]


def test_outcontrol_selection_is_independent_of_tp_and_sp():
    # Recorded over iterations 0-1 (selected at 2): up to the first update the TP=2 run differs from
    # TP=1 by FP32 reduction order only. Recording later measures FP4's amplification of those
    # last-bit differences instead (after two updates the runs' grad norms differ by ~1e-3, see
    # test_gpt_tp2_sp_matches_tp1_quartet2), which can swap channels at the top-k boundary.
    kw = dict(SMALL, recipe="tetrajet2-full", train_steps=4,
              recipe_overrides=dict(SCHEDULE, outcontrol_record_start=0.0, outcontrol_record_iters=2.0))
    tp1 = dist.run(w.train_with_stabilizers, 1, kw, timeout=300)[0]
    tp2 = dist.run(w.train_with_stabilizers, 2, dict(kw, tp=2, sequence_parallel=True), timeout=300)
    for r in tp2:
        assert r["masks"] == tp1["masks"]


@pytest.mark.parametrize("recipe, bf16, distributed", [("tetrajet2", False, True), ("quartet2", True, True),
                                                        ("nvidia", True, False)],
                         ids=["distopt-tetrajet2-fp32-params", "distopt-quartet2-bf16-params",
                              "float16opt-nvidia-bf16-params"])
def test_distributed_optimizer_resets_exactly_what_the_full_masters_would(recipe, bf16, distributed):
    """DP=2: the distributed optimizer's sharded masters (or the Float16 optimizer's full masters) get
    exactly the resets of OsciReset on the gathered full masters, on the same run."""
    overrides = dict(SCHEDULE, oscireset=True, oscireset_threshold=1.5)
    reports = dist.run(w.oscireset_sharded_vs_full, 2,
                       dict(SMALL, recipe=recipe, recipe_overrides=overrides, train_steps=12, bf16=bf16,
                            use_distributed_optimizer=distributed), timeout=300)
    for r in reports:
        assert r["compared"] > 0 and r["mismatches"] == 0, r
        assert r["events"] and r["shadow_resets"] > 0, r   # the comparison saw real resets
        assert r["real_resets"] <= r["shadow_resets"]        # each rank resets only its shard


def test_resume_mid_window_and_mid_recording_matches_the_uninterrupted_run(tmp_path):
    kw = dict(SMALL, recipe="tetrajet2-full",
              recipe_overrides=dict(SCHEDULE, outcontrol_record_start=2.0, outcontrol_record_iters=3.0,
                                    oscireset_threshold=1.5), train_steps=12)
    # split after update 5 (0-based 0..4 done): OutControl has recorded iterations 2-4 of 2-4 and
    # selects at 5 after the resume; OsciReset's window 4-7 is in progress
    r = dist.run(w.resume_equivalence, 1, kw, 5, str(tmp_path / "ckpt"), timeout=400)[0]
    assert r["straight_losses"] == r["resumed_losses"], r
    assert r["mismatched"] == [], r["mismatched"]
    assert [(e["layer"], e["update"], e["reset"]) for e in r["straight_events"]] == \
        [(e["layer"], e["update"], e["reset"]) for e in r["resumed_events"]]


def test_chained_optimizer_hooks_every_member():
    r = dist.run(w.oscireset_chained, 1,
                 dict(SMALL, recipe="tetrajet2", recipe_overrides=dict(SCHEDULE, oscireset=True, oscireset_threshold=1.5),
                      train_steps=12), timeout=300)[0]
    assert len(r["per_member"]) == 2 and all(r["per_member"]), r
    assert not set(r["per_member"][0]) & set(r["per_member"][1]), r
    assert r["events"] == [7, 11], r
    # resets happened in layers owned by each member
    assert any(name in r["reset_layers"] for name in r["per_member"][0]), r
    assert any(name in r["reset_layers"] for name in r["per_member"][1]), r


def test_recipe_yaml_keeps_chosen_layers_in_bf16(tmp_path):
    """Per-layer overrides from the recipe YAML reach the built model: the first layer and every fc2
    run the stock BF16 GEMM, the rest the recipe."""
    path = tmp_path / "mixed.yaml"
    path.write_text("family: quartet2\nbf16_first_layers: 1\nbf16_modules: ['*.linear_fc2']\n")
    flags = dist.run(w.bf16_layer_flags, 1, dict(SMALL, recipe=str(path)), timeout=120)[0]
    assert len(flags) == 8, flags
    for name, bf16 in flags.items():
        expected = name.startswith("decoder.layers.0.") or name.endswith("linear_fc2")
        assert bf16 == expected, (name, bf16)


def test_install_stabilizers_declares_the_run_length_for_fractional_schedules(monkeypatch):
    # Megatron's own loop (GPU route) only calls install_stabilizers; OutControl's window in the
    # layers reads the schedule from `state`, so fractions of the run must resolve after it
    import dataclasses

    import torch

    from megatron_fp4.megatron import state
    from megatron_fp4.megatron.optimizer_hooks import install_stabilizers
    from megatron_fp4.registry import load_recipe
    recipe = dataclasses.replace(load_recipe("tetrajet2-full"), oscireset=False)
    assert 0 < recipe.oscireset_start < 1                 # the released YAML uses fractions
    layer = torch.nn.Linear(4, 4)
    layer.nvfp4_recipe = recipe
    monkeypatch.setattr(state, "_train_iters", None)
    with pytest.raises(RuntimeError, match="run length is unknown"):
        state.stabilizer_schedule(recipe)
    assert install_stabilizers(None, [layer], 1050) is None
    assert state.stabilizer_schedule(recipe) == recipe.stabilizer_schedule(1050)
    assert state.stabilizer_schedule(recipe)["oscireset_start"] == round(recipe.oscireset_start * 1050)
