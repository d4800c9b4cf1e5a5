"""The late precision switch (--nvfp4-bf16-from ITER|FRACTION, --nvfp4-bf16-from-scope all|forward): before
the switch the plugin linears run the recipe, from it on BF16 (every GEMM, or only the forward GEMM while the
backward keeps the recipe's quantized GEMMs), as a function of the iteration (resume-safe), refused where it
cannot hold; checked on a real plugin layer against torch's linear and the recipe's own linear."""
import types

import pytest

import nvfp4_workers as w
from megatron_fp4.errors import UsageError
from megatron_fp4.megatron.validate import resolve_bf16_from
from megatron_fp4.testing import dist


@pytest.mark.parametrize("recipe", ["quartet2", "nvidia"])
def test_switch_per_iteration_and_scope(recipe):
    r = dist.run(w.bf16_switch, 1, recipe)[0]
    for scope in ("all", "forward"):
        before, after = r[f"{scope}_2"], r[f"{scope}_3"]
        # iteration 2: exactly the layer without a switch, and not BF16
        assert before["fwd_is_recipe"] and before["dx_is_recipe"] and before["dw_is_recipe"], before
        assert not (before["fwd_is_bf16"] or before["dw_is_bf16"]), before
        assert after["fwd_is_bf16"] and not after["fwd_is_recipe"], after          # iteration 3: BF16 forward
    assert r["all_3"]["dx_is_bf16"] and r["all_3"]["dw_is_bf16"], r["all_3"]
    # forward scope: the backward GEMMs stay the recipe's (the same quantized operands and random streams)
    assert r["forward_3"]["dx_is_recipe"] and r["forward_3"]["dw_is_recipe"], r["forward_3"]
    assert not r["forward_3"]["dw_is_bf16"], r["forward_3"]


@pytest.mark.parametrize("value, train_iters, expect", [
    (None, 100, None), (91, 100, 91), (0.9, 100, 91), (0.5, 3, 2), (1, 100, 1)])
def test_iteration_or_fraction(value, train_iters, expect):
    assert resolve_bf16_from(types.SimpleNamespace(nvfp4_bf16_from=value, train_iters=train_iters)) == expect


@pytest.mark.parametrize("value, train_iters, match", [
    (0, 100, "an integer >= 1"), (2.5, 100, "an integer >= 1"), (101, 100, "after the last iteration"),
    (0.5, None, "a fraction needs --train-iters")])
def test_bad_values_are_one_line_errors(value, train_iters, match):
    with pytest.raises(UsageError, match=match):
        resolve_bf16_from(types.SimpleNamespace(nvfp4_bf16_from=value, train_iters=train_iters))
