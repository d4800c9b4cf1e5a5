"""megatron_fp4.install() in a Megatron-LM checkout: the plugin flags all honoured, the plugin spec and
--transformer-impl local set when left out, refusals and bad plugin flags stopped before Megatron's
argument table, and the spec function working on both of Megatron's model-builder paths.

The megatron-core wheel has no Megatron-LM scripts, so the script below does what a core_r0.19
checkout's pretrain_gpt.py does up to the model (install(), Megatron's parse_and_validate_args, then
the model) with megatron.training's own functions; `gpt_builder_path` builds the model as
Megatron-LM's gpt_builders.gpt_builder does (a plain TransformerConfig from
core_transformer_config_from_args, the spec from import_module(args.spec), GPTModel). Megatron's
pretrain() itself needs CUDA and is not run."""
import argparse
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(240)

ENV = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
ARG_TABLE = "------------------------ arguments ------------------------"
SIZES = {"--num-layers": "3", "--hidden-size": "128", "--num-attention-heads": "4", "--ffn-hidden-size": "256",
         "--seq-length": "64", "--max-position-embeddings": "64", "--micro-batch-size": "2", "--train-iters": "2"}
FIXED = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "256", "--position-embedding-type", "rope",
         "--normalization", "RMSNorm", "--use-cpu-initialization", "--no-gradient-accumulation-fusion",
         "--no-masked-softmax-fusion", "--no-rope-fusion", "--no-persist-layer-norm", "--swiglu"]


def model_flags(**sizes):
    """The model's flags; sizes={"hidden_size": "96"} replaces one."""
    chosen = dict(SIZES, **{"--" + k.replace("_", "-"): v for k, v in sizes.items()})
    return [x for kv in chosen.items() for x in kv] + FIXED


MODEL = model_flags()

_CHECKOUT = textwrap.dedent("""
    import json, os, sys
    import megatron_fp4; megatron_fp4.install()          # the one line of the README
    import torch, torch.distributed as dist
    from megatron.training.arguments import parse_and_validate_args
    args = parse_and_validate_args(args_defaults={"tokenizer_type": "GPT2BPETokenizer"})
    if os.environ.get("ONLY_PARSE"):
        print("PARSED " + json.dumps({"spec": args.spec, "impl": args.transformer_impl}))
        sys.exit(0)
    dist.init_process_group("gloo", rank=0, world_size=1, init_method="file://" + os.environ["PG_FILE"])
    from megatron_fp4.patches import torch_cpu
    torch_cpu.install()
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer import transformer_block
    from megatron.core.transformer.spec_utils import import_module
    from megatron.training.argument_utils import (core_transformer_config_from_args, gpt_config_from_args,
                                                  pretrain_cfg_container_from_args)
    ps.initialize_model_parallel()
    model_parallel_cuda_manual_seed(1)
    args.params_dtype = torch.float32

    def linears(model):
        return {n: {"cls": type(m).__name__, "bf16": m.nvfp4_bf16, "recipe": m.nvfp4_recipe.name,
                    "eden_group": getattr(m.nvfp4_recipe, "eden_group", None)}
                for n, m in model.named_modules() if hasattr(m, "nvfp4_bf16")}

    # config-container path (core_r0.19 pretrain_gpt.py): GPTModelBuilder calls the spec function
    cfg = pretrain_cfg_container_from_args(args, gpt_config_from_args(args))
    container = cfg.model.get_builder_cls()(cfg.model).build_model(ProcessGroupCollection.use_mpu_process_groups())

    # model_provider path (gpt_builders.gpt_builder): the spec function goes to GPTModel as it is
    def gpt_builder_path():
        config = core_transformer_config_from_args(args)
        return GPTModel(config=config, transformer_layer_spec=import_module(args.spec),
                        vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
                        pre_process=True, post_process=True, parallel_output=True,
                        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                        position_embedding_type=args.position_embedding_type)
    builder = gpt_builder_path()
    # what Megatron's own block does with a spec function, without the patch
    try:
        transformer_block._get_block_submodules.__wrapped__(core_transformer_config_from_args(args),
                                                            import_module(args.spec))
        unpatched = "built"
    except Exception as exc:
        unpatched = str(exc)
    print("RESULT " + json.dumps({"container": linears(container), "builder": linears(builder),
                                  "unpatched": unpatched, "spec": args.spec, "impl": args.transformer_impl}))
""")


def _run(tmp_path, argv, **env):
    script = tmp_path / "pretrain_gpt.py"
    script.write_text(_CHECKOUT)
    return subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=220,
                          env=dict(ENV, PG_FILE=str(tmp_path / "pg"), **env), cwd=str(tmp_path))


def _error_lines(stderr):
    return [l for l in stderr.splitlines() if l.strip() and "No CUDA runtime is found" not in l]


def test_install_honours_every_plugin_flag_on_both_builder_paths(tmp_path):
    proc = _run(tmp_path, MODEL + ["--nvfp4-recipe", "quartet2", "--nvfp4-override", "eden_group=16",
                                   "--nvfp4-bf16-modules", "decoder.layers.0.*,*.layers.2.mlp.linear_fc2"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["spec"] == ["megatron_fp4.spec", "gpt_layer_spec"] and result["impl"] == "local"
    expected_bf16 = {f"decoder.layers.0.{s}" for s in ("self_attention.linear_qkv", "self_attention.linear_proj",
                                                       "mlp.linear_fc1", "mlp.linear_fc2")}
    expected_bf16.add("decoder.layers.2.mlp.linear_fc2")
    for path in ("container", "builder"):
        layers = result[path]
        assert len(layers) == 12, (path, layers)
        assert {n for n, v in layers.items() if v["bf16"]} == expected_bf16, (path, layers)
        assert all(v["recipe"] == "quartet2" and v["eden_group"] == 16 and v["cls"].startswith("NVFP4")
                   for v in layers.values()), (path, layers)
    assert result["unpatched"] == "specialize for function."      # the crash the patch removes
    # the run log names the same BF16 linears (and what install() set)
    log = next(l for l in proc.stdout.splitlines() if l.startswith("megatron_fp4: recipe quartet2"))
    assert "5 of 12 linears: decoder.layers.0.*, decoder.layers.2.mlp.linear_fc2" in log, log
    assert "--spec megatron_fp4.spec gpt_layer_spec set by install()" in log and "--transformer-impl local" in log
    assert proc.stdout.index(ARG_TABLE) < proc.stdout.index(log)


def test_without_a_recipe_install_leaves_megatron_alone(tmp_path):
    proc = _run(tmp_path, MODEL, ONLY_PARSE="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.split("PARSED ", 1)[1]) == {"spec": None, "impl": "transformer_engine"}
    assert "megatron_fp4: recipe" not in proc.stdout


def test_a_user_error_is_one_line_before_megatrons_table_and_debug_shows_the_traceback(tmp_path):
    proc = _run(tmp_path, MODEL + ["--nvfp4-recipe", "quartet2", "--transformer-impl", "transformer_engine"])
    lines = _error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("megatron_fp4: error: unsupported configuration: --transformer-impl transformer_engine")
    assert ARG_TABLE not in proc.stdout
    debug = _run(tmp_path, MODEL + ["--nvfp4-recipe", "nope"], MEGATRON_FP4_DEBUG="1")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "RecipeError: --nvfp4-recipe nope" in debug.stderr


# Errors raised inside Megatron's own parse_and_validate_args (in this process; the one-line printing
# is the excepthook checked above).
INSTALL_CASES = [
    (["--nvfp4-recipe", "nope"], "--nvfp4-recipe nope: unknown recipe"),
    (["--nvfp4-bf16-modules", "decoder.layers.0.*"], "--nvfp4-bf16-modules needs --nvfp4-recipe"),
    (["--nvfp4-override", "eden_group=16"], "--nvfp4-override needs --nvfp4-recipe"),
    (["--spec", "megatron_fp4.spec", "gpt_layer_spec"], "--spec megatron_fp4.spec gpt_layer_spec needs --nvfp4-recipe"),
    (["--nvfp4-recipe", "quartet2", "--spec", "megatron.core.models.gpt.gpt_layer_specs", "get_gpt_layer_local_spec"],
     "must come from the plugin spec"),
    (["--nvfp4-recipe", "quartet2", "--nvfp4-bf16-modules", "decoder.layer.0.*"], "matches no linear"),
    (["--nvfp4-recipe", "tetrajet2"], "multiple of 128"),       # with hidden size 96 (below)
    (["--nvfp4-recipe", "quartet2", "--fp8-format", "e4m3"], "--fp8-format e4m3: Transformer Engine FP8 cannot be combined"),
    (["--nvfp4-recipe", "quartet2", "--num-experts", "4"], "MoE"),
    (["--nvfp4-recipe", "quartet2", "--mtp-num-layers", "1"], "--mtp-num-layers 1"),
    (["--" + "mfp4-recipe", "quartet2"], "--" + "mfp4-recipe was renamed to --nvfp4-recipe"),   # the earlier prefix
]


@pytest.mark.parametrize("extra, match", INSTALL_CASES, ids=[m for _, m in INSTALL_CASES])
def test_install_route_refusals_and_bad_plugin_flags(extra, match, monkeypatch, capsys):
    import megatron_fp4
    from megatron.training import arguments
    from megatron.training.global_vars import unset_global_variables

    from megatron_fp4.errors import one_line, user_error_types
    megatron_fp4.install()
    argv = model_flags(hidden_size="96") if extra == ["--nvfp4-recipe", "tetrajet2"] else MODEL
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *argv, *extra])
    unset_global_variables()
    try:
        with pytest.raises(user_error_types()) as exc:
            arguments.parse_and_validate_args()
    finally:
        unset_global_variables()
    assert match in one_line(exc.value), one_line(exc.value)
    assert ARG_TABLE not in capsys.readouterr().out


def test_install_registers_the_plugin_flags_without_a_default_recipe():
    import megatron_fp4
    megatron_fp4.install()
    from megatron.training import arguments
    ns = arguments.add_megatron_arguments(argparse.ArgumentParser()).parse_args([])
    assert ns.nvfp4_recipe is None and ns.nvfp4_bf16_modules == "" and ns.nvfp4_debug_errors is False
