"""The GPU route of the launcher (megatron.training.pretrain), checked on CPU up to pretrain():
route selection, launcher defaults, Megatron argument parsing with the plugin flags, the config
container (NVFP4TransformerConfig + plugin spec), the GPT dataset provider (mock data and the corpus
builder's indexed datasets), and forward_step + loss on a model built by Megatron's own builder."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_fp4 import pretrain_gpt
from megatron_fp4.pretrain_support import DATA_FLAGS, launcher_argv, loss_func

pytestmark = pytest.mark.timeout(120)

TINY = ["--num-layers", "2", "--hidden-size", "128", "--ffn-hidden-size", "256", "--num-attention-heads", "4",
        "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3",
        "--swiglu"]


@pytest.fixture
def megatron_globals():
    from megatron.training.global_vars import unset_global_variables
    unset_global_variables()
    yield
    unset_global_variables()


def test_route_selection(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pretrain_gpt.use_gpu_route([]) and not pretrain_gpt.use_gpu_route(["--nvfp4-cpu"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not pretrain_gpt.use_gpu_route([])


def test_launcher_defaults_fill_only_missing_flags():
    out = launcher_argv(["--num-layers", "3", "--mock-data", "--fp16"])
    assert out.count("--num-layers") == 1 and out[out.index("--num-layers") + 1] == "3"
    assert "--bf16" not in out and "--transformer-impl" in out and "--train-data-path" not in out
    assert out[out.index("--tokenizer-type") + 1] == "NullTokenizer" and out[out.index("--vocab-size") + 1] == "256"
    # no data flag: the main job's corpus under --save, byte-level EOD 0, a final save
    main = launcher_argv(["--save", "run_x", "--seq-length", "64"])
    assert main[main.index("--train-data-path") + 1] == os.path.join("run_x", "corpus", "train")
    assert main[main.index("--null-tokenizer-eod-id") + 1] == "0"
    assert main[main.index("--max-position-embeddings") + 1] == "64"
    assert main[main.index("--save-interval") + 1] == main[main.index("--train-iters") + 1]
    assert not any(f in launcher_argv(["--data-path", "p"]) for f in ("--mock-data", "--train-data-path"))
    assert "--data-path" in DATA_FLAGS


def test_build_config_and_mock_datasets(megatron_globals):
    from megatron_fp4.megatron.config import NVFP4TransformerConfig
    from megatron_fp4.pretrain_support import build_config, get_batch, train_valid_test_datasets_provider
    from megatron_fp4.spec import gpt_layer_spec
    args, cfg = build_config(TINY + ["--mock-data", "--nvfp4-recipe", "tetrajet2",
                                     "--nvfp4-override", "sr_headroom=1.0", "--nvfp4-bf16-modules", "*.linear_fc2"])
    t = cfg.model.transformer
    assert isinstance(t, NVFP4TransformerConfig) and t.nvfp4_recipe == "tetrajet2"
    assert t.nvfp4_overrides == {"sr_headroom": 1.0} and t.nvfp4_bf16_modules == ("*.linear_fc2",)
    assert cfg.model.transformer_layer_spec is gpt_layer_spec and args.transformer_impl == "local"
    assert cfg.model.vocab_size == 256 and t.gated_linear_unit and t.normalization == "RMSNorm"
    assert not cfg.model.share_embeddings_and_output_weights and not t.add_bias_linear
    train, valid, test = train_valid_test_datasets_provider([8, 4, 4])
    assert len(train) >= 8 and len(valid) >= 4
    batch = get_batch(iter(torch.utils.data.DataLoader(train, batch_size=2)), device="cpu")
    assert batch["tokens"].shape == (2, 32) and batch["labels"].shape == (2, 32)
    assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])
    assert int(batch["tokens"].max()) < 256


def test_cpu_initialization_moves_the_chunks_to_the_gpu_before_wrapping(megatron_globals, monkeypatch):
    """megatron-core 0.19's config-container builder leaves --use-cpu-initialization weights on the
    CPU (get_model would move them); the launcher's pre-wrap hook moves them."""
    from megatron.training.global_vars import unset_global_variables

    from megatron_fp4.pretrain_support import build_config, place_cpu_initialized_chunks_on_gpu
    _, cfg = build_config(TINY + ["--mock-data", "--use-cpu-initialization"])
    assert place_cpu_initialized_chunks_on_gpu in cfg.model.pre_wrap_hooks
    unset_global_variables()
    _, cfg = build_config(TINY + ["--mock-data"])
    assert place_cpu_initialized_chunks_on_gpu not in cfg.model.pre_wrap_hooks

    class Chunk:
        device = None

        def cuda(self, device):
            self.device = device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    chunks = [Chunk(), Chunk()]
    assert place_cpu_initialized_chunks_on_gpu(chunks) is chunks
    assert [c.device for c in chunks] == [3, 3]


def test_refusals_and_bad_input(megatron_globals):
    from megatron.training.global_vars import unset_global_variables

    from megatron_fp4.megatron.config import UnsupportedConfigError
    from megatron_fp4.pretrain_support import build_config, gpt_dataset_config
    from megatron_fp4.registry import RecipeError
    with pytest.raises(RecipeError, match="unknown recipe"):
        build_config(TINY + ["--mock-data", "--nvfp4-recipe", "nope"])
    unset_global_variables()
    with pytest.raises(UnsupportedConfigError, match="transformer-impl local"):
        build_config(TINY + ["--mock-data", "--transformer-impl", "transformer_engine"])
    unset_global_variables()
    args, _ = build_config(TINY + ["--mock-data"])
    args.mock_data = False
    with pytest.raises(ValueError, match="no training data"):
        gpt_dataset_config(args, None)


def test_corpus_datasets_for_the_main_job(tmp_path, megatron_globals):
    """No data flag: the launcher points Megatron at the corpus builder's output, and the provider
    builds it (byte-level, EOD 0) and reads it through GPTDataset."""
    from megatron.core.datasets.gpt_dataset import GPTDataset

    from megatron_fp4.pretrain_support import build_config, train_valid_test_datasets_provider
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"m{i}.py").write_text("def f(x):\n    return x * %d\n" % i * 30)
    args, _ = build_config(TINY + ["--save", str(tmp_path / "run"), "--nvfp4-corpus-src", str(src)])
    from megatron.training import get_tokenizer
    assert get_tokenizer().eod == 0 and args.vocab_size == 256
    train, valid, _ = train_valid_test_datasets_provider([8, 4, 4])
    assert isinstance(train, GPTDataset) and os.path.exists(tmp_path / "run" / "corpus" / "train.idx")
    sample = train[0]
    text = bytes(sample["tokens"][sample["tokens"] > 0].to(torch.uint8).tolist()).decode()
    assert "return x *" in text


def test_loss_func_counts_masked_tokens():
    out = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    total, n, report = loss_func(mask, out, check_nan=False)
    assert float(total) == 7.0 and int(n) == 3 and report["lm loss"].tolist() == [7.0, 3.0]


_MODEL_SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    from megatron_fp4.pretrain_support import build_config, forward_step, train_valid_test_datasets_provider
    args, cfg = build_config(sys.argv[1:])
    dist.init_process_group("gloo", rank=0, world_size=1, init_method="file://" + os.environ["PG_FILE"])
    from megatron_fp4.patches import torch_cpu
    torch_cpu.install()
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.rerun_state_machine import initialize_rerun_state_machine
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron_fp4.megatron import state
    ps.initialize_model_parallel()
    model_parallel_cuda_manual_seed(1)
    initialize_rerun_state_machine()
    t = cfg.model.transformer              # CPU: FP32 params (the GPU route keeps --bf16)
    t.params_dtype, t.bf16, t.pipeline_dtype = torch.float32, False, torch.float32
    model = cfg.model.get_builder_cls()(cfg.model).build_model(ProcessGroupCollection.use_mpu_process_groups())
    fc1 = model.decoder.layers[0].mlp.linear_fc1
    assert type(fc1).__name__ == "NVFP4ColumnParallelLinear" and fc1.nvfp4_recipe.name == "quartet2", fc1
    train, _, _ = train_valid_test_datasets_provider([4, 2, 2])
    it = iter(torch.utils.data.DataLoader(train, batch_size=2))
    args.curr_iteration = 5
    out, lf = forward_step(it, model)
    assert state.get_iteration() == 5
    total, n, report = lf(out)
    (total / n).backward()
    assert torch.isfinite(total) and int(n) == 64 and fc1.weight.grad.abs().sum() > 0
    print("OK", float(total / n))
""")


def test_forward_step_on_a_model_from_megatrons_builder(tmp_path):
    """Megatron's GPTModelBuilder with the launcher's config builds plugin layers; forward_step
    sets the iteration, and the loss backpropagates (CPU, gloo, the test shim)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", PG_FILE=str(tmp_path / "pg"), OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", _MODEL_SCRIPT, *TINY, "--mock-data", "--nvfp4-recipe", "quartet2",
                           "--use-cpu-initialization"], capture_output=True, text=True, timeout=110, env=env)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_training_history_records_losses_and_validation(monkeypatch):
    """The run summary's recorder: training_log gives per-iteration losses, Megatron's evaluate the
    validation losses (at the iteration of the last training log). The wrapped functions here are
    stand-ins for megatron.training's, which need a GPU to run."""
    from megatron.training import training
    from megatron_fp4.pretrain_support import TrainingHistory
    seen = []
    monkeypatch.setattr(training, "training_log", lambda loss_dict, *a, **k: seen.append(loss_dict) or 0)
    monkeypatch.setattr(training, "evaluate",
                        lambda *a, **k: ({"lm loss": torch.tensor(2.5)}, None, False))
    # stand-in for Megatron's: evaluates through the module-level evaluate()
    monkeypatch.setattr(training, "evaluate_and_print_results", lambda prefix, *a, **k: training.evaluate())
    history = TrainingHistory(summary_path=None, every=0).install()
    for it in (1, 2, 3):
        training.training_log({"lm loss": torch.tensor(4.0 - it)}, {}, 1e-3, it)
    training.evaluate_and_print_results("iteration 3 on validation set")
    training.evaluate_and_print_results("iteration 3 on test set")   # the final test-set pass
    summary = history.summary(warmup=0)
    assert summary["losses"] == [(1, 3.0), (2, 2.0), (3, 1.0)] and len(seen) == 3
    assert summary["valid"] == [(3, 2.5)]


def test_training_history_continues_a_resumed_runs_summary(monkeypatch, tmp_path):
    """A run resumed from a checkpoint (the quality benchmark split across device calls) continues
    the summary its earlier segment wrote: losses and validation points before the resume point are
    kept, those after it (trained again) replaced; a fresh start (iteration 1) drops the old one."""
    import json
    from megatron.training import training
    from megatron_fp4.pretrain_support import TrainingHistory
    monkeypatch.setattr(training, "training_log", lambda *a, **k: 0)
    monkeypatch.setattr(training, "evaluate", lambda *a, **k: ({"lm loss": torch.tensor(1.5)}, None, False))
    monkeypatch.setattr(training, "evaluate_and_print_results", lambda prefix, *a, **k: training.evaluate())
    path = tmp_path / "summary.json"
    # the earlier segment trained to 25 (cut short), evaluated at 10 and 20; the checkpoint is at 20
    earlier = {"losses": [[i, 10.0 - 0.1 * i] for i in range(1, 26)], "valid": [[10, 9.0], [20, 8.0]],
               "median_step_s": 0.5, "device": "NVIDIA H100 80GB HBM3"}
    path.write_text(json.dumps(earlier))
    history = TrainingHistory(summary_path=str(path), every=0).install()
    for it in (21, 22, 23, 24, 25, 26, 27, 28, 29, 30):
        training.training_log({"lm loss": torch.tensor(1.0)}, {}, 1e-3, it)
    training.evaluate_and_print_results("iteration 30 on validation set")
    s = history.summary(warmup=0)
    iterations = [i for i, _ in s["losses"]]
    assert iterations == list(range(1, 31))                       # 21-25 from this segment only
    assert dict(s["losses"])[20] == pytest.approx(8.0) and dict(s["losses"])[21] == 1.0
    assert s["valid"] == [(10, 9.0), (20, 8.0), (30, 1.5)] and s["iterations"] == 30
    assert [(g["first_iteration"], g["last_iteration"]) for g in s["segments"]] == [(1, 20), (21, 30)]
    assert s["segments"][0]["device"] == "NVIDIA H100 80GB HBM3"
    # a fresh run writing to the same place starts over
    path.write_text(json.dumps(s))
    fresh = TrainingHistory(summary_path=str(path), every=0).install()
    training.training_log({"lm loss": torch.tensor(3.0)}, {}, 1e-3, 1)
    s2 = fresh.summary(warmup=0)
    assert s2["losses"] == [(1, 3.0)] and s2["valid"] == [] and len(s2["segments"]) == 1


def test_one_main_job_table_for_both_routes_and_the_driver(megatron_globals):
    """The CPU route's parser, the GPU route's Megatron arguments (launcher defaults + Megatron's
    parsing) and the driver's GPTSettings all default to defaults.MAIN_JOB."""
    from megatron_fp4.defaults import MAIN_JOB, MAIN_JOB_SWITCHES
    from megatron_fp4.megatron.driver import GPTSettings
    from megatron_fp4.pretrain_support import build_config
    cpu = pretrain_gpt.cpu_parser().parse_args([])
    gpu, _ = build_config(["--mock-data"])
    for name, value in MAIN_JOB.items():
        assert getattr(cpu, name) == value, name
        assert getattr(gpu, name) == value, name
    assert not gpu.add_bias_linear and gpu.untie_embeddings_and_output_weights
    assert set(MAIN_JOB_SWITCHES) == {"untie_embeddings_and_output_weights", "disable_bias_linear"}
    s = GPTSettings()
    driver_names = {"warmup_steps": "lr_warmup_iters", "train_steps": "train_iters"}
    for field in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "seq_length", "vocab_size",
                  "micro_batch_size", "lr", "min_lr", "weight_decay", "clip_grad", "warmup_steps", "train_steps",
                  "seed", "normalization"):
        assert getattr(s, field) == MAIN_JOB[driver_names.get(field, field)], field


def test_one_summary_schema_and_earlier_summaries_upgraded(tmp_path):
    """summary.make takes exactly the schema's fields; a summary written before the schema (CPU route:
    losses as a plain list from iteration 1; fields absent) is read in the schema's form."""
    import json

    from megatron_fp4 import summary
    with pytest.raises(summary.SummaryError, match="missing"):
        summary.make(route="cpu", recipe="quartet2")
    old_cpu = {"recipe": "quartet2", "finished": True, "iterations": 3, "losses": [5.0, 4.0, None],
               "valid": [[3, 4.5]], "device": "cpu", "layout": {"tp": 1, "pp": 1, "vpp": None, "dp": 1,
                                                                 "num_microbatches": 1}, "collectives": {"x": 1}}
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(old_cpu))
    s = summary.load(str(path))
    assert s["schema"] == summary.SCHEMA and s["route"] == "cpu"
    assert s["losses"] == [[1, 5.0], [2, 4.0], [3, None]] and s["first_loss"] == 5.0 and s["last_loss"] == 4.0
    assert set(s["layout"]) == set(summary.LAYOUT) and s["comm"] == {"collectives": {"x": 1}}
    assert summary.check(json.loads(json.dumps(s))) == s          # round trip through JSON
    path.write_text(json.dumps(dict(s, extra=1)))
    with pytest.raises(summary.SummaryError, match="unknown \\['extra'\\]"):
        summary.load(str(path))
