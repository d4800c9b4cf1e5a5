"""megatron_fp4/megatron/diagnostics.py: the collective byte counter, the first-step gradient dump at
the TP=1 layout, the last-bit perturbation, and their refusals (2 gloo ranks)."""
import math

import pytest
import torch

from megatron_fp4.megatron.diagnostics import compare_gradients
from megatron_fp4.testing import dist

import diagnostics_workers as W

pytestmark = pytest.mark.timeout(300)


def test_counter_counts_each_collective_by_group_role():
    for r in dist.run(W.counted_collectives, 2):
        recs = r["records"]
        # bytes from the tensors' sizes, written out: gathers count the gathered output
        assert recs["1:all_gather_into_tensor/tp"] == [6 * 5 * 4 + 8 * 8 * 2, 2]   # incl. Megatron's bound gather
        assert recs["1:reduce_scatter_tensor/tp"] == [6 * 2 * 4, 1]
        assert recs["1:all_reduce/tp"] == [7 * 4, 1]
        assert recs["2:all_reduce/world"] == [7 * 4, 1]
        assert not any("local" in k or "/dp" in k for k in recs)             # one-rank groups move nothing
        per = r["report"]["per_iteration"]
        assert r["report"]["iterations"] == 2
        assert per["all_gather_into_tensor/tp"] == {"bytes": (120 + 128) / 2, "calls": 1.0}
        assert r["installed"] and r["restored"]


SETTINGS = W.SMALL


@pytest.mark.parametrize("recipe", ["bf16", "quartet2"])
def test_first_step_gradients_tp2_sp_at_the_tp1_layout(tmp_path, recipe):
    """The dump gathers TP shards back to the TP=1 layout (SwiGLU fc1 reordered to [gate; up]): FP32
    TP=2+SP gradients equal TP=1's to reduction order, and the stream keys are identical."""
    s = dict(SETTINGS, recipe=recipe)
    one, two = str(tmp_path / "tp1.pt"), str(tmp_path / "tp2.pt")
    assert dist.run(W.first_step, 1, s, one)[0]["restored"]
    assert all(r["restored"] for r in dist.run(W.first_step, 2, s, two, 2, True))
    a, b = torch.load(one, weights_only=False), torch.load(two, weights_only=False)
    assert a["tp"] == 1 and b["tp"] == 2 and a["iteration"] == 0
    assert set(a["grads"]) == set(b["grads"]) and len(a["grads"]) == 15
    for name, g in a["grads"].items():
        assert b["grads"][name].shape == g.shape, name
    r = compare_gradients(a, b)
    # FP32 reduction order: 1e-7 measured; a wrong gather layout would differ at O(1)
    assert r["relative_l2"] < 1e-5, r
    if recipe == "quartet2":
        assert a["keys"] == b["keys"] and len(a["keys"]) == 2 * 4        # 4 quantized linears per layer
    else:
        assert a["keys"] == {} or a["keys"] == b["keys"]


def test_perturbation_and_other_draws(tmp_path):
    """Controls of the multi-GPU gradient comparison: another recipe seed changes the gradients at
    O(0.1) (other random draws) and the keys; a (1 + 2^-22) weight scaling leaves the keys alone."""
    s = dict(SETTINGS, recipe="quartet2")
    ref, pert, other = (str(tmp_path / f"{n}.pt") for n in ("ref", "pert", "other"))
    dist.run(W.first_step, 1, s, ref)
    dist.run(W.first_step, 1, s, pert, 1, False, 2.0 ** -22)
    dist.run(W.first_step, 1, dict(s, recipe_overrides={"seed": 4321}), other)
    a, p, o = (torch.load(x, weights_only=False) for x in (ref, pert, other))
    draws = compare_gradients(a, o)["relative_l2"]
    assert 0.05 < draws < 1.0
    assert a["keys"] == p["keys"] and all(a["keys"][k] != o["keys"][k] for k in a["keys"])
    assert compare_gradients(a, p)["relative_l2"] > 0        # the weights did change


@pytest.mark.parametrize("settings, what, match", [
    (dict(SETTINGS, recipe="quartet2", bf16=True), "perturb", "FP32 parameters"),
    (dict(SETTINGS, recipe="quartet2", pp=2, num_layers=2), "dump", "--pipeline-model-parallel-size 1"),
])
def test_diagnostics_refuse_what_they_cannot_measure(settings, what, match):
    world = settings.get("pp", 1)
    messages = dist.run(W.refusals, world, settings, what)
    assert all(m is not None and match in m for m in messages), messages


def test_compare_gradients_against_float64_and_bad_input():
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(4, 3, generator=g), "v": torch.randn(5, generator=g)}
    b = {"w": a["w"] + 0.1 * torch.randn(4, 3, generator=g), "v": a["v"].clone()}
    r = compare_gradients({"grads": a}, {"grads": b})
    num = sum(((a[k].double() - b[k].double()) ** 2).sum().item() for k in a)
    den = sum((a[k].double() ** 2).sum().item() for k in a)
    assert math.isclose(r["relative_l2"], math.sqrt(num / den), rel_tol=1e-12)
    assert r["worst_tensor"] == "w" and r["tensors"] == 2
    with pytest.raises(ValueError, match="different parameters"):
        compare_gradients({"grads": a}, {"grads": {"w": a["w"]}})
    with pytest.raises(ValueError, match="shape"):
        compare_gradients({"grads": a}, {"grads": {"w": a["w"].t(), "v": a["v"]}})
    with pytest.raises(ValueError, match="small finite"):
        from megatron_fp4.megatron.diagnostics import perturb_initial_weights
        perturb_initial_weights([], None, float("nan"))
