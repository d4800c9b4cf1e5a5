"""Launcher flags, recipe errors, refused combinations, install(), corpus builder, and the main job
in a reduced (CI-sized) form."""
import argparse
import json
import os
import subprocess
import sys
import types

import pytest

from megatron_fp4.megatron.config import (REFUSED, UnsupportedConfigError, check_supported, check_supported_args,
                                          layer_in_bf16, module_in_bf16)
from megatron_fp4.pretrain_gpt import add_plugin_args, cpu_parser, parse_overrides, plugin_recipe
from megatron_fp4.errors import UsageError
from megatron_fp4.registry import RecipeError

pytestmark = pytest.mark.timeout(300)


def _args(*argv):
    return add_plugin_args(argparse.ArgumentParser()).parse_args(list(argv))


def test_plugin_flags_parse_and_build_the_recipe():
    a = _args("--nvfp4-recipe", "quartet2", "--nvfp4-override", "eden_group=16", "--nvfp4-override",
              "four_over_six=false", "--nvfp4-bf16-modules", "decoder.layers.0.*")
    recipe = plugin_recipe(a)
    assert recipe.eden_group == 16 and recipe.four_over_six is False
    assert parse_overrides(["eden_c=0.9"]) == {"eden_c": 0.9}
    assert cpu_parser().parse_args(["--nvfp4-recipe", "nvidia"]).nvfp4_recipe == "nvidia"


@pytest.mark.parametrize("argv, match", [
    (("--nvfp4-recipe", "nope"), "unknown recipe"),
    (("--nvfp4-override", "eden_group=7"), "eden_group"),
    (("--nvfp4-override", "no_such_knob=1"), "unknown knob"),
    (("--nvfp4-override", "novalue"), "KEY=VALUE"),
])
def test_bad_plugin_flags_fail_clearly(argv, match):
    with pytest.raises((RecipeError, ValueError), match=match):
        plugin_recipe(_args(*argv))


def test_bad_yaml_recipe_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("family: quartet2\n  eden_group: [16\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        plugin_recipe(_args("--nvfp4-recipe", str(bad)))


@pytest.mark.parametrize("field, value, match", [
    ("fp8", "e4m3", "fp8-format"), ("fp4", "e2m1", "fp4-format"), ("fp4_param", True, "fp4-param-gather"),
    ("delay_wgrad_compute", True, "delay-wgrad-compute"), ("use_megatron_fsdp", True, "FSDP"),
])
def test_refused_config_combinations(field, value, match):
    cfg = types.SimpleNamespace(**{field: value})
    with pytest.raises(UnsupportedConfigError, match=match):
        check_supported(cfg)
    with pytest.raises(UnsupportedConfigError, match="MoE"):
        check_supported(types.SimpleNamespace(), is_expert=True)


@pytest.mark.parametrize("flag, match", [
    ({"use_precision_aware_optimizer": True}, "precision-aware"), ({"num_experts": 8}, "MoE"),
    ({"transformer_impl": "transformer_engine"}, "transformer-impl local"),
    ({"fp4_param_gather": True}, "param-gather"),
])
def test_refused_launch_args(flag, match):
    with pytest.raises(UnsupportedConfigError, match=match):
        check_supported_args(types.SimpleNamespace(**flag))


def _refused_value(refusal):
    return "transformer_engine" if refusal.flag == "--transformer-impl" else \
        ("e4m3" if refusal.flag in ("--fp8-format", "--fp4-format") else (8 if refusal.flag in ("--num-experts",
                                                                                                 "--mtp-num-layers") else True))


@pytest.mark.parametrize("refusal", REFUSED, ids=[r.flag for r in REFUSED])
def test_one_refusal_table_on_every_route(refusal):
    """Each refused setting of the one table is refused, with the same reason naming its flag, on Megatron's
    args (launcher GPU route, install()), on a TransformerConfig (spec / layers) where it lives there, and
    by the CPU driver's parser (which knows none of these flags but names the refusal, not a typo)."""
    value = _refused_value(refusal)
    with pytest.raises(UnsupportedConfigError) as on_args:
        check_supported_args(types.SimpleNamespace(**{refusal.args_attr: value}))
    assert refusal.flag in str(on_args.value) and refusal.why in str(on_args.value)
    if refusal.config_attr:
        with pytest.raises(UnsupportedConfigError) as on_config:
            check_supported(types.SimpleNamespace(**{refusal.config_attr: value}))
        assert str(on_config.value) == str(on_args.value)
    allowed = refusal.allowed[-1]
    check_supported_args(types.SimpleNamespace(**{refusal.args_attr: allowed}))     # the allowed value passes
    from megatron_fp4 import pretrain_gpt
    argv = [refusal.flag] + ([] if value is True else [str(value)])
    with pytest.raises(UsageError) as on_cpu:
        pretrain_gpt.parse_cpu_args(["--nvfp4-cpu", *argv])
    assert refusal.why in str(on_cpu.value)


def test_bf16_layer_and_module_rules():
    cfg = types.SimpleNamespace(first_last_layers_bf16=True, num_layers_at_start_in_bf16=1,
                                num_layers_at_end_in_bf16=2, num_layers=6,
                                nvfp4_bf16_modules=("*.linear_fc2", "decoder.layers.3.*"))
    assert [layer_in_bf16(cfg, n) for n in range(1, 7)] == [True, False, False, False, True, True]
    assert module_in_bf16(cfg, "decoder.layers.1.mlp.linear_fc2")
    assert module_in_bf16(cfg, "decoder.layers.3.self_attention.linear_qkv")
    assert not module_in_bf16(cfg, "decoder.layers.1.mlp.linear_fc1")


def test_install_registers_flags_with_megatron():
    import megatron_fp4
    megatron_fp4.install()
    from megatron.training import arguments
    parser = arguments.add_megatron_arguments(argparse.ArgumentParser())
    ns = parser.parse_args(["--nvfp4-recipe", "tetrajet2", "--nvfp4-override", "sr_headroom=1.0"])
    assert ns.nvfp4_recipe == "tetrajet2" and ns.nvfp4_override == ["sr_headroom=1.0"]
    # the training-loop hooks: stabilizers after setup, their state beside each checkpoint
    from megatron.training import training
    assert hasattr(training.setup_model_and_optimizer, "__wrapped__")
    assert hasattr(training.save_checkpoint, "__wrapped__")


def test_corpus_builder_holds_out_whole_files(tmp_path):
    from megatron_fp4.data import corpus
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"f{i}.py").write_text(f"# file {i}\nprint({i})\n" * (i + 1))
    info = corpus.build(str(src), str(tmp_path / "out"), valid_fraction=0.2)
    c = info["counts"]
    assert c["valid_files"] > 0 and c["train_files"] > 0 and c["valid_files"] + c["train_files"] == 40
    tokens = corpus.load_tokens(info["prefixes"]["valid"])
    assert len(tokens) == c["valid"] and (tokens == corpus.EOD).sum() == c["valid_files"]
    text = bytes(tokens[tokens != corpus.EOD]).decode()
    assert "print(" in text


STABILIZER_FLAGS = ["--nvfp4-override", "outcontrol_record_start=1", "--nvfp4-override", "outcontrol_record_iters=1",
                    "--nvfp4-override", "oscireset_start=0", "--nvfp4-override", "oscireset_period=3",
                    "--nvfp4-override", "oscireset_window=1"]


@pytest.mark.parametrize("recipe, extra", [("quartet2", []), ("tetrajet2-full", STABILIZER_FLAGS)],
                         ids=["quartet2", "tetrajet2-full"])
def test_main_job_reduced(tmp_path, recipe, extra):
    """The README's main-job command in CI size: few steps, tiny corpus, same code path; with
    tetrajet2-full the stabilizers run (OutControl records iteration 1 and selects at 2; OsciReset's
    first window starts at update 0 and resets at update 2)."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        (src / f"m{i}.py").write_text("def f(x):\n    return x * %d\n" % i * 40)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_fp4.pretrain_gpt", "--nvfp4-cpu", "--nvfp4-recipe", recipe, *extra,
           "--nvfp4-corpus-src", str(src), "--save", str(out), "--num-layers", "2", "--hidden-size", "128",
           "--ffn-hidden-size", "256", "--seq-length", "64", "--micro-batch-size", "2", "--train-iters", "4",
           "--log-interval", "1", "--eval-interval", "4", "--eval-iters", "1", "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "lm loss" in proc.stdout and "tokens/s" in proc.stdout and "validation loss" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 4
    assert os.path.getsize(summary["plot"]) > 1000
    assert os.path.isdir(summary["checkpoint"]) and os.listdir(summary["checkpoint"])
    rows = json.loads((out / "precision.json").read_text())["rows"]      # the start table (issue #19)
    assert len(rows) == 2 * 4 * 3 and f"megatron_fp4 precision: recipe {recipe}; device cpu" in proc.stdout
    if recipe == "quartet2":    # the report command on this run directory, with a statistics file
        with open(out / "nvfp4_stats.jsonl", "w") as fh:
            for it in (1, 2, 3):
                for layer in ("decoder.layers.0.mlp.linear_fc1", "decoder.layers.1.mlp.linear_fc2"):
                    fh.write(json.dumps({"iteration": it, "layer": layer, "operand": "forward X", "amax": 2.0 * it,
                                         "flushed_fraction": 0.0, "rel_error": 0.01 / it}) + "\n")
        report = subprocess.run([sys.executable, "-m", "megatron_fp4.report", str(out), "--out", str(tmp_path / "rep")],
                                capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        assert report.returncode == 0, report.stderr[-3000:]
        assert report.stdout.startswith("megatron_fp4 precision: recipe quartet2") and "linear_qkv" in report.stdout
        for name in ("loss_curves.png", "nvfp4_stats.png"):
            assert os.path.getsize(tmp_path / "rep" / name) > 1000
    if recipe == "tetrajet2-full":
        assert {e["update"] for e in summary["oscireset_events"]} == {2}, summary["oscireset_events"]
        assert len(summary["outcontrol"]) == 8 and all(v["iteration"] == 2 for v in summary["outcontrol"].values())
        assert any(f.startswith("nvfp4_oscireset_rank") for f in os.listdir(summary["checkpoint"]))


def _layout(*argv, world=2):
    from megatron_fp4.pretrain_gpt import parallel_layout
    return parallel_layout(cpu_parser().parse_args(list(argv)), world)


def test_parallel_layout_from_megatron_flags():
    assert _layout("--tensor-model-parallel-size", "2", "--sequence-parallel") == {
        "tp": 2, "pp": 1, "vpp": None, "dp": 1, "num_microbatches": 1, "global_batch_size": 8}
    # DP is what the world leaves; the global batch splits into micro-batches per replica
    assert _layout("--micro-batch-size", "2", "--global-batch-size", "16", world=4)["num_microbatches"] == 2
    lay = _layout("--pipeline-model-parallel-size", "2", "--num-layers", "8",
                  "--num-layers-per-virtual-pipeline-stage", "2")
    assert (lay["pp"], lay["vpp"], lay["dp"]) == (2, 2, 1)


@pytest.mark.parametrize("argv, world, match", [
    (("--tensor-model-parallel-size", "2"), 3, "not divisible by TP x PP"),
    (("--sequence-parallel",), 2, "needs --tensor-model-parallel-size > 1"),
    (("--num-virtual-stages-per-pipeline-rank", "2"), 2, "need --pipeline-model-parallel-size >= 2"),
    (("--pipeline-model-parallel-size", "2", "--num-layers", "6", "--num-layers-per-virtual-pipeline-stage", "2"),
     2, "not divisible by PP x"),
    (("--micro-batch-size", "3", "--global-batch-size", "8"), 2, "not divisible by micro-batch size"),
    (("--tensor-model-parallel-size", "0"), 2, "must be >= 1"),
])
def test_bad_parallel_layouts_fail_clearly(argv, world, match):
    with pytest.raises(ValueError, match=match):
        _layout(*argv, world=world)


def test_cpu_launcher_refuses_what_its_driver_does_not_build():
    for argv in (("--position-embedding-type", "learned_absolute"), ("--transformer-impl", "transformer_engine"),
                 ("--lr-decay-style", "linear")):
        with pytest.raises(SystemExit):
            cpu_parser().parse_args(list(argv))


def test_data_parallel_replicas_split_the_one_rank_stream():
    """Replica r of DP=2 reads micro-batches r, r+2, ... of the stream a one-rank run reads, so a
    global batch holds the same windows at every DP size."""
    import numpy as np

    from megatron_fp4.megatron.driver import GPTSettings
    from megatron_fp4.pretrain_gpt import _windows
    tokens = np.arange(10_000, dtype=np.int32) % 256
    s = GPTSettings(seq_length=16, micro_batch_size=2)
    one = _windows(tokens, s, 7)
    r0, r1 = _windows(tokens, s, 7, 0, 2), _windows(tokens, s, 7, 1, 2)
    for _ in range(3):
        for replica in (r0, r1):
            assert (next(replica)["tokens"] == next(one)["tokens"]).all()
