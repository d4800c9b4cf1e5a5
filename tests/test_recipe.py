"""Recipes: built-in YAML files, the knob defaults of numerics.md §9, and strict validation."""
import pytest

from megatron_fp4 import registry
from megatron_fp4.recipe import Quartet2Recipe
from megatron_fp4.registry import RecipeError, available_recipes, load_recipe

REQUIRED = {"bf16", "nvidia", "nvidia-46", "tetrajet2", "quartet2", "quartet2-no46"}


def test_every_required_recipe_ships_and_loads():
    assert REQUIRED <= set(available_recipes())
    for name in available_recipes():
        recipe = load_recipe(name)
        assert recipe.name == name
        assert name in recipe.describe()


@pytest.mark.parametrize("name, family, knobs", [
    ("quartet2", "quartet2", dict(four_over_six=True, eden_group=128, eden_c=0.93, eden_smax=255.99,
                                  rht_size=128, rht_signs="fresh", rtn_ties="even")),
    ("quartet2-no46", "quartet2", dict(four_over_six=False, eden_group=128)),
    ("quartet2-kernel", "quartet2", dict(eden_group=16)),
    ("tetrajet2", "tetrajet2", dict(sr_headroom=1.0, rht_size=16, rht_signs="fresh", outer_block=128)),
    ("nvidia", "nvidia", dict(four_over_six=False, sr_headroom=17 / 16, rht_size=16, rht_signs="fixed")),
    ("nvidia-46", "nvidia", dict(four_over_six=True)),
    ("bf16", "bf16", dict()),
])
def test_spec_defaults(name, family, knobs):
    recipe = load_recipe(name)
    assert recipe.family == family
    for key, value in knobs.items():
        assert getattr(recipe, key) == value, key


def test_bf16_recipe_is_not_quantized():
    assert not load_recipe("bf16").quantized
    assert load_recipe("quartet2").quantized


def test_overrides_and_paths(tmp_path):
    recipe = load_recipe("quartet2", {"eden_group": 16, "seed": 7})
    assert recipe.eden_group == 16 and recipe.seed == 7 and recipe.name == "quartet2"
    path = tmp_path / "mine.yaml"
    path.write_text("family: tetrajet2\nsr_headroom: 1.0625\ngemm_emulation: fp32\n")
    mine = load_recipe(str(path))
    assert mine.name == "mine" and mine.sr_headroom == 17 / 16 and mine.gemm_emulation == "fp32"
    again = load_recipe(mine, {"rtn_ties": "away"})
    assert again.rtn_ties == "away" and again.gemm_emulation == "fp32"


def test_int_is_accepted_for_float_knob():
    assert load_recipe("tetrajet2", {"sr_headroom": 1}).sr_headroom == 1.0


@pytest.mark.parametrize("overrides, key", [
    ({"four_over_sixx": True}, "four_over_sixx"),         # unknown key
    ({"four_over_six": "yes"}, "four_over_six"),          # wrong type
    ({"eden_group": 64}, "eden_group"),                   # not a choice
    ({"eden_group": True}, "eden_group"),                 # bool is not an int
    ({"rht_signs": "random"}, "rht_signs"),
    ({"seed": 1.5}, "seed"),
    ({"eden_c": 3.0}, "eden_c"),                          # validate(): out of range
])
def test_bad_knobs_name_the_key(overrides, key):
    with pytest.raises(RecipeError, match=key):
        load_recipe("quartet2", overrides)


def test_knob_of_another_family_is_unknown():
    with pytest.raises(RecipeError, match="outer_block"):
        load_recipe("quartet2", {"outer_block": 128})


@pytest.mark.parametrize("text, message", [
    ("family: quartet2\neden_group: [16\n", "not valid YAML"),
    ("", "empty recipe file"),
    ("- family\n- quartet2\n", "expected a mapping"),
    ("eden_group: 16\n", "missing key 'family'"),
    ("family: quartet3\n", "unknown family 'quartet3'"),
])
def test_bad_yaml_files(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=message):
        load_recipe(str(path))


def test_unknown_recipe_name_lists_the_builtins():
    with pytest.raises(RecipeError, match="quartet2"):
        load_recipe("quartet5")


def test_missing_file():
    with pytest.raises(RecipeError, match="not found"):
        load_recipe("/nonexistent/recipe.yaml")


@pytest.mark.parametrize("name, in_f, out_f, message", [
    ("quartet2", 100, 256, "in_features"),
    ("quartet2", 256, 200, "out_features"),   # RHT-128 along N in dgrad
    ("tetrajet2", 192, 256, "in_features"),   # double blocks need 128
    ("nvidia", 256, 24, "out_features"),
])
def test_shape_checks(name, in_f, out_f, message):
    with pytest.raises(ValueError, match=message):
        load_recipe(name).check_shapes(in_f, out_f)


def test_shape_checks_accept_valid_sizes():
    load_recipe("quartet2").check_shapes(16, 128)
    load_recipe("tetrajet2").check_shapes(128, 128)
    load_recipe("nvidia").check_shapes(16, 16)


def test_recipe_dir_is_package_data():
    assert registry.builtin_recipe_dir().endswith("recipes")


def test_dataclass_is_usable_directly():
    recipe = Quartet2Recipe(name="direct", eden_group=16)
    assert load_recipe(recipe) is recipe


def test_stabilizer_presets_and_schedule_scaling():
    full = load_recipe("tetrajet2-full")
    plus = load_recipe("quartet2-plus")
    assert full.family == "tetrajet2" and full.outcontrol and full.oscireset
    assert plus.family == "quartet2" and plus.outcontrol and plus.oscireset and plus.four_over_six
    assert not load_recipe("tetrajet2").outcontrol and not load_recipe("tetrajet2").oscireset
    # at the released OLMo2-70M length the fractions give back the released schedule (to rounding)
    sched = full.stabilizer_schedule(12505)
    assert sched["outcontrol_record_iters"] == 50 and sched["oscireset_window"] == 50
    assert sched["oscireset_period"] == 200 and abs(sched["oscireset_start"] - 8000) <= 5
    assert abs(sched["outcontrol_record_start"] - 501) <= 2
    # a short run keeps a valid window inside each period; absolute values stay absolute
    short = full.stabilizer_schedule(100)
    assert short["oscireset_window"] >= 1 and short["oscireset_period"] >= short["oscireset_window"] + 2
    absolute = load_recipe("tetrajet2-full", {"oscireset_start": 300.0}).stabilizer_schedule(100)
    assert absolute["oscireset_start"] == 300


@pytest.mark.parametrize("name, overrides, key", [
    ("nvidia", {"outcontrol": True}, "outcontrol"),
    ("bf16", {"oscireset": True}, "oscireset"),
    ("tetrajet2", {"outcontrol_ratio": 1.5}, "outcontrol_ratio"),
    ("tetrajet2", {"oscireset_threshold": -1.0}, "oscireset_threshold"),
    ("tetrajet2", {"oscireset_variant": "sampled"}, "oscireset_variant"),
])
def test_bad_stabilizer_knobs(name, overrides, key):
    with pytest.raises(RecipeError, match=key):
        load_recipe(name, overrides)


def test_bf16_layer_overrides(tmp_path):
    path = tmp_path / "mixed.yaml"
    path.write_text("family: quartet2\nbf16_first_layers: 1\nbf16_last_layers: 2\n"
                    "bf16_modules: ['*.linear_fc2', 'decoder.layers.3.self_attention.*']\n")
    recipe = load_recipe(str(path))
    assert recipe.bf16_modules == ("*.linear_fc2", "decoder.layers.3.self_attention.*")
    name = "decoder.layers.{}.self_attention.linear_qkv"
    assert [recipe.keeps_in_bf16(n, 8, name.format(n - 1)) for n in range(1, 9)] == \
        [True, False, False, True, False, False, True, True]
    assert recipe.keeps_in_bf16(3, 8, "decoder.layers.2.mlp.linear_fc2")
    assert not load_recipe("quartet2").keeps_in_bf16(1, 8, name.format(0))
    with pytest.raises(RecipeError, match="bf16_modules"):
        load_recipe("quartet2", {"bf16_modules": [1, 2]})
    with pytest.raises(RecipeError, match="bf16_first_layers"):
        load_recipe("quartet2", {"bf16_first_layers": -1})
