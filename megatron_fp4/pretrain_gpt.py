"""Pretrain a GPT with NVFP4 linears: `python -m megatron_fp4.pretrain_gpt [flags]`.

Route selection (`use_gpu_route`): with CUDA available (`torch.cuda.is_available()` and at least one
device) and no `--nvfp4-cpu`, the GPU route runs; otherwise the CPU driver. The same command therefore
uses the GPU when there is one. Under torchrun every rank takes the same route.

GPU route: Megatron's own training loop (`megatron.training.pretrain`, NCCL) with all of Megatron's
flags plus the plugin's (`--nvfp4-recipe NAME|PATH`, `--nvfp4-override key=value`,
`--nvfp4-bf16-modules`), `--transformer-impl local`, NVFP4TransformerConfig and the plugin spec
(megatron_fp4.spec.gpt_layer_spec); forward step and GPTDataset provider in pretrain_support.py.
Flags left out get the main job's defaults (small GPT, byte-level NullTokenizer with vocab 256, the
stdlib corpus built under `--save`, default `nvfp4_run`); fusions whose apex/TE kernels are missing
are switched off. After the run a summary JSON (loss per iteration, median step time, peak memory)
and a loss plot go to `--nvfp4-summary` (default `<save>/summary.json`).

CPU route (no GPU, or --nvfp4-cpu): megatron.training cannot run on CPU, so a driver built from
megatron-core's GPTModel, DDP, optimizer and forward-backward schedule trains on gloo with the CPU
shim. The default run is the main job: a small GPT with quartet2 on the Python standard library's
sources (byte-level tokens; built into a Megatron indexed dataset on first use), printing progress
lines, saving checkpoints in Megatron's layout (atomically; `--save-interval`, `--load` resumes bit for
bit: megatron_fp4/megatron/checkpoint.py) and a loss plot. Exit status: 0 finished, 1 a non-finite
loss or grad norm, 2 a user error, 3 stopped by the time budget or SIGTERM (checkpoint saved).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from typing import Optional

import numpy as np
import torch

from .errors import UsageError
from .megatron.validate import parse_overrides, plugin_recipe  # noqa: F401  (the launcher's plugin flags)
from .patches.megatron_args import DEFAULT_RECIPE, add_plugin_args  # noqa: F401
from .pretrain_support import _plot, add_diagnostic_args  # noqa: F401


# --------------------------------------------------------------------------------------------------
# GPU: megatron.training.pretrain
# --------------------------------------------------------------------------------------------------

def _gpu_main(argv):
    from megatron.core.enums import ModelType
    from megatron.training import pretrain

    from .patches import megatron_args, megatron_checkpoint, megatron_training
    from .pretrain_support import (TrainingHistory, build_config, forward_step, prepare_gpu_save_folder,
                                   single_process_env, train_valid_test_datasets_provider, write_summary)

    single_process_env()

    megatron_args.apply()
    megatron_training.apply()        # stabilizers after setup_model_and_optimizer; dataset helpers
    megatron_checkpoint.apply()      # atomic saves
    with megatron_args.one_line_argparse_errors():     # Megatron's parser: one line, not its usage text
        args, cfg = build_config(argv)    # plugin checks run before Megatron's argument table (patches/)
    if args.nvfp4_count_collectives:
        from .megatron.diagnostics import install_collective_counter
        install_collective_counter()
    prepare_gpu_save_folder(args)         # an earlier run's checkpoints: resume, --overwrite or refuse
    summary_path = args.nvfp4_summary or (os.path.join(args.save, "summary.json") if args.save else None)
    history = TrainingHistory(summary_path, every=args.log_interval).install()
    if args.nvfp4_stats_interval:         # quantization statistics after Megatron's log line (issue #19)
        from .megatron.quant_stats import install_gpu_reporter
        install_gpu_reporter(args)
    exit_request = None
    try:
        pretrain(cfg, train_valid_test_datasets_provider, ModelType.encoder_or_decoder, forward_step)
    except SystemExit as request:        # Megatron's early exits (--exit-duration-in-mins, signals) call sys.exit
        exit_request = request
    summary = write_summary(history, args, summary_path, stopped_by=None if exit_request is None else
                            "Megatron's early exit (--nvfp4-time-budget / --exit-duration-in-mins / signal)")
    if summary is not None:
        from .pretrain_support import json_safe
        brief = {k: v for k, v in summary.items() if k != 'losses'}
        print(f"nvfp4 summary: {json.dumps(json_safe(brief), allow_nan=False)}", flush=True)
    if exit_request is not None:
        done = history.records[-1]["iteration"] if history.records else 0
        if exit_request.code in (0, None) and done < (args.train_iters or 0):
            if int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1:
                print(f"stopped by Megatron's early exit (--nvfp4-time-budget / --exit-duration-in-mins / signal) "
                      f"at iteration {done} of {args.train_iters}: the run did not finish; resume with --load "
                      f"{args.save}", flush=True)
            raise SystemExit(STOPPED_EXIT_CODE)
        raise exit_request
    return summary


# --------------------------------------------------------------------------------------------------
# CPU: megatron-core driver
# --------------------------------------------------------------------------------------------------

class _UsageErrorParser(argparse.ArgumentParser):
    """argparse's errors as a UsageError (one line, no usage dump), with the CPU driver's reason
    for the fixed choices it refuses."""

    def error(self, message):
        raise UsageError(_explain_argparse_error(message))


def cpu_parser(raise_usage_errors: bool = False) -> argparse.ArgumentParser:
    """The CPU route's flags (Megatron's names); defaults: the main job (defaults.MAIN_JOB)."""
    from .defaults import MAIN_JOB as D
    cls = _UsageErrorParser if raise_usage_errors else argparse.ArgumentParser
    p = cls(prog="python -m megatron_fp4.pretrain_gpt",
            description="NVFP4 GPT pretraining (CPU driver; Megatron flag names)", allow_abbrev=False)
    a = p.add_argument
    a("--num-layers", type=int, default=D["num_layers"])
    a("--hidden-size", type=int, default=D["hidden_size"])
    a("--ffn-hidden-size", type=int, default=D["ffn_hidden_size"])
    a("--num-attention-heads", type=int, default=D["num_attention_heads"])
    a("--seq-length", type=int, default=D["seq_length"])
    a("--micro-batch-size", type=int, default=D["micro_batch_size"])
    a("--global-batch-size", type=int, default=None)
    a("--train-iters", type=int, default=D["train_iters"])
    a("--lr", type=float, default=D["lr"])
    a("--min-lr", type=float, default=D["min_lr"])
    a("--lr-warmup-iters", type=int, default=D["lr_warmup_iters"])
    a("--weight-decay", type=float, default=D["weight_decay"])
    a("--clip-grad", type=float, default=D["clip_grad"])
    a("--seed", type=int, default=D["seed"])
    a("--swiglu", action="store_true")
    a("--data-path", default=None, help="indexed-dataset prefix (train); default: build the corpus")
    a("--valid-data-path", default=None)
    a("--mock-data", action="store_true", help="synthetic learnable sequences instead of a corpus")
    a("--nvfp4-corpus-src", default=None, help="directory of text files (default: Python stdlib)")
    a("--save", default="nvfp4_run", help="output directory: checkpoints (Megatron's layout), loss plot, summary")
    a("--save-interval", type=int, default=None,
      help="save a checkpoint every N iterations (and always after the last one)")
    a("--load", default=None,
      help="resume from the newest checkpoint in this folder (a folder without one: start fresh, as in Megatron)")
    a("--overwrite", "--nvfp4-overwrite", dest="nvfp4_overwrite", action="store_true",
      help="start fresh in a --save folder that holds an earlier run's checkpoints (deletes them, its summary "
           "and plot); without it such a run is refused")
    a("--no-check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad", action="store_false",
      help="train on through a non-finite loss or grad norm (by default the run stops with an error naming the "
           "iteration, as in Megatron)")
    a("--exit-signal-handler", action="store_true",
      help="on SIGTERM, finish the iteration, save a checkpoint and stop (exit status 3), as in Megatron")
    a("--log-interval", type=int, default=D["log_interval"])
    a("--eval-interval", type=int, default=D["eval_interval"])
    a("--eval-iters", type=int, default=D["eval_iters"])
    a("--nvfp4-time-budget", type=float, default=None, metavar="SECONDS",
      help="stop training after this many seconds: save a checkpoint, print 'stopped by time budget at "
           "iteration N of M; resume with --load DIR' and exit with status 3 (default: no budget)")
    a("--nvfp4-cpu", action="store_true", help="use the CPU driver even when a GPU is present")
    a("--nvfp4-summary", default=None, help="run summary JSON (default <save>/summary.json)")
    a("--threads", type=int, default=None)
    # parallelism (under torchrun; gloo): the data-parallel size is what the world size leaves
    par = p.add_argument_group("parallelism (torchrun --nproc-per-node N; gloo)")
    par.add_argument("--tensor-model-parallel-size", type=int, default=1)
    par.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    par.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    par.add_argument("--num-virtual-stages-per-pipeline-rank", type=int, default=None)
    par.add_argument("--sequence-parallel", action="store_true")
    par.add_argument("--use-distributed-optimizer", action="store_true")
    par.add_argument("--overlap-grad-reduce", action="store_true",
                     help="reduce each gradient bucket as soon as backward completes it")
    par.add_argument("--overlap-param-gather", action="store_true", help="accepted; no overlap on CPU")
    # Megatron flags the launch scripts pass: accepted where they name what the CPU driver builds
    # (Llama-style GPT: RoPE, untied embeddings, no biases, local transformer), refused otherwise
    meg = p.add_argument_group("Megatron model flags (the CPU driver's fixed choices)")
    meg.add_argument("--max-position-embeddings", type=int, default=None)
    meg.add_argument("--position-embedding-type", choices=["rope"], default=D["position_embedding_type"])
    meg.add_argument("--normalization", choices=["RMSNorm", "LayerNorm"], default=D["normalization"])
    meg.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                     help="accepted: the CPU driver always unties them")
    meg.add_argument("--disable-bias-linear", action="store_true", help="accepted: the CPU driver has no biases")
    meg.add_argument("--transformer-impl", choices=["local"], default=D["transformer_impl"])
    meg.add_argument("--bf16", action="store_true", help="BF16 parameters and activations (FP32 otherwise)")
    meg.add_argument("--nvfp4-fp32", action="store_true", help="FP32 parameters and activations (the default here)")
    meg.add_argument("--tokenizer-type", choices=["NullTokenizer"], default=D["tokenizer_type"])
    meg.add_argument("--vocab-size", type=int, default=D["vocab_size"], help="vocabulary (>= 256; byte-level data)")
    meg.add_argument("--lr-decay-style", choices=["cosine"], default=D["lr_decay_style"])
    meg.add_argument("--full-validation", action="store_true",
                     help="evaluate the whole held-out split (consecutive windows, full micro-batches) instead of "
                          "--eval-iters random micro-batches")
    meg.add_argument("--use-cpu-initialization", action="store_true",
                     help="accepted: the CPU driver always draws full weights on the CPU")
    meg.add_argument("--first-last-layers-bf16", action="store_true")
    meg.add_argument("--num-layers-at-start-in-bf16", type=int, default=1)
    meg.add_argument("--num-layers-at-end-in-bf16", type=int, default=1)
    add_plugin_args(p)
    add_diagnostic_args(p)
    return p


# the CPU driver's fixed model choices (argparse choices of cpu_parser)
CPU_FIXED_CHOICES = ("--position-embedding-type", "--normalization", "--transformer-impl", "--tokenizer-type",
                     "--lr-decay-style")


def _refusal(flag: str, value) -> Optional[str]:
    from types import SimpleNamespace

    from .megatron.config import REFUSED_BY_FLAG, check_supported_args
    refusal = REFUSED_BY_FLAG.get(flag)
    if refusal is None or refusal.args_attr is None:
        return None
    try:
        check_supported_args(SimpleNamespace(**{refusal.args_attr: value}))
    except UsageError as err:
        return str(err)
    return None


def _explain_argparse_error(message: str) -> str:
    import re
    m = re.match(r"argument (--[\w-]+)[^:]*: invalid choice: '([^']*)'", message)
    if m:
        flag, value = m.groups()
        reason = _refusal(flag, value)
        if reason:
            return reason
        if flag in CPU_FIXED_CHOICES:
            return (f"{message}: the CPU driver builds one fixed Llama-style GPT; on a GPU the launcher passes "
                    "every Megatron choice to megatron.training")
    return message


def _megatron_flags() -> set:
    import warnings
    with warnings.catch_warnings():          # megatron.training's import-time notices (no apex / TE)
        warnings.simplefilter("ignore")
        from megatron.training.arguments import add_megatron_arguments
    return set(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))._option_string_actions)


def _explain_unknown(unknown: list, parser: argparse.ArgumentParser) -> UsageError:
    """Why the CPU driver does not take a flag: a refusal of the plugin, a Megatron flag it does not
    build, or a typo."""
    import difflib
    index = next((i for i, a in enumerate(unknown) if a.startswith("-")), None)
    if index is None:
        return UsageError(f"unexpected argument {unknown[0]!r}: every setting is a --flag (`--help` lists them)")
    token = unknown[index]
    flag = token.split("=", 1)[0]
    if "=" in token:
        value = token.split("=", 1)[1]
    elif index + 1 < len(unknown) and not unknown[index + 1].startswith("--"):
        value = unknown[index + 1]
    else:
        value = True
    reason = _refusal(flag, value)
    if reason:
        return UsageError(reason)
    if flag in _megatron_flags():
        return UsageError(f"{flag}: a Megatron flag the CPU driver does not take (it trains one fixed Llama-style GPT "
                          "on gloo; `python -m megatron_fp4.pretrain_gpt --nvfp4-cpu --help` lists its flags); drop "
                          "it, or run on a GPU, where the launcher passes every Megatron flag to megatron.training")
    close = difflib.get_close_matches(flag, list(parser._option_string_actions), n=1)
    return UsageError(f"unrecognized argument {flag}" + (f"; did you mean {close[0]}?" if close else "")
                      + " (`python -m megatron_fp4.pretrain_gpt --nvfp4-cpu --help` lists the flags)")


def parse_cpu_args(argv) -> argparse.Namespace:
    """The CPU route's flags; argparse errors and unknown flags become one-line UsageErrors."""
    parser = cpu_parser(raise_usage_errors=True)
    args, unknown = parser.parse_known_args(list(argv))
    if unknown:
        raise _explain_unknown(unknown, parser)
    return args


def _launch_world_size() -> int:
    """The world the CPU route will join: torchrun's, or one process (_init_cpu_process_group)."""
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return 1


def validate_cpu_args(args):
    """Every start-time check of the CPU route (flags, recipe, BF16 patterns, shapes, layout, data
    files); returns the RunPlan (recipe and BF16 linears). Raises UsageError / RecipeError."""
    from .megatron.validate import check_data_paths, validate_run
    if args.bf16 and args.nvfp4_fp32:
        raise UsageError("--bf16 and --nvfp4-fp32 contradict each other; pass one (the CPU route's default is FP32)")
    if args.vocab_size < 256:
        raise UsageError(f"--vocab-size {args.vocab_size}: the byte-level data needs at least 256")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if args.nvfp4_corpus_src and not os.path.isdir(args.nvfp4_corpus_src):
        raise UsageError(f"--nvfp4-corpus-src {args.nvfp4_corpus_src}: directory not found (a directory of text files)")
    if args.valid_data_path and not args.data_path:
        raise UsageError("--valid-data-path needs --data-path (the training split)")
    check_data_paths(args)
    if not args.mock_data and not args.data_path:
        from .data.corpus import check_source
        check_source(args.nvfp4_corpus_src)      # the corpus built on first use needs >= 2 files
    world = _launch_world_size()
    plan = validate_run(args, world)
    parallel_layout(args, world)
    return plan


def parallel_layout(args, world_size: int) -> dict:
    """TP/PP/VPP/DP sizes and micro-batches per step from Megatron's flags and the world size."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        raise UsageError(f"parallel sizes must be >= 1, got TP={tp}, PP={pp}")
    if world_size % (tp * pp):
        raise UsageError(f"world size {world_size} is not divisible by TP x PP = {tp} x {pp}")
    dp = world_size // (tp * pp)
    vpp = args.num_virtual_stages_per_pipeline_rank
    if args.num_layers_per_virtual_pipeline_stage is not None:
        per = args.num_layers_per_virtual_pipeline_stage
        if per < 1 or args.num_layers % (pp * per):
            raise UsageError(f"--num-layers {args.num_layers} is not divisible by PP x "
                             f"--num-layers-per-virtual-pipeline-stage = {pp} x {per}")
        vpp = args.num_layers // (pp * per)
    if vpp is not None and vpp > 1 and pp < 2:
        raise UsageError("virtual pipeline stages need --pipeline-model-parallel-size >= 2")
    vpp = vpp if vpp and vpp > 1 else None
    if args.num_layers % (pp * (vpp or 1)):
        raise UsageError(f"--num-layers {args.num_layers} is not divisible by the {pp * (vpp or 1)} pipeline stages")
    if args.sequence_parallel and tp == 1:
        raise UsageError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    per_step = args.micro_batch_size * dp
    gbs = args.global_batch_size or per_step
    if gbs % per_step:
        raise UsageError(f"--global-batch-size {gbs} is not divisible by micro-batch size x data-parallel "
                         f"size = {args.micro_batch_size} x {dp}")
    return {"tp": tp, "pp": pp, "vpp": vpp, "dp": dp, "num_microbatches": gbs // per_step,
            "global_batch_size": gbs}


def _corpus(args):
    from .data import corpus
    if args.data_path:
        return args.data_path, args.valid_data_path or args.data_path
    return corpus.ensure(os.path.join(args.save, "corpus"), args.nvfp4_corpus_src)


def _windows(tokens: np.ndarray, s, seed: int, dp_rank: int = 0, dp_size: int = 1, skip: int = 0):
    """Micro-batches of random windows from one stream; with data parallelism replica r takes the
    stream's micro-batches r, r + dp, r + 2 dp, ... so that a global batch holds the same samples at
    every DP size (as Megatron's sampler does). `skip`: micro-batches of this replica already consumed
    (a resumed run continues the stream where its checkpoint left it)."""
    from .megatron.driver import batch_from_tokens
    rng = np.random.default_rng(seed)
    n = s.seq_length + 1
    for _ in range(skip * dp_size):
        rng.integers(0, len(tokens) - n, size=s.micro_batch_size)
    for index in itertools.count():
        starts = rng.integers(0, len(tokens) - n, size=s.micro_batch_size)
        if index % dp_size == dp_rank:
            yield batch_from_tokens(torch.from_numpy(np.stack([tokens[i:i + n] for i in starts]).astype(np.int64)))


def _full_split_batches(tokens: np.ndarray, s) -> list:
    """--full-validation: the whole split as consecutive windows (each token predicted once), in full
    micro-batches (the last windows that fill no micro-batch, < micro-batch x seq tokens, are left out)."""
    from .megatron.driver import batch_from_tokens
    windows = (len(tokens) - 1) // s.seq_length // s.micro_batch_size * s.micro_batch_size
    if windows == 0:
        raise UsageError(f"--full-validation: the held-out split has {len(tokens)} tokens, fewer than one micro-batch "
                         f"({s.micro_batch_size} x {s.seq_length} + 1); lower --micro-batch-size or hold out more")
    index = np.arange(s.seq_length + 1)[None, :] + s.seq_length * np.arange(windows)[:, None]
    w = torch.from_numpy(tokens[index].astype(np.int64))
    return [batch_from_tokens(w[i:i + s.micro_batch_size]) for i in range(0, windows, s.micro_batch_size)]


def _init_cpu_process_group():
    """gloo: torchrun's env:// rendezvous when launched by it, else a one-process group on an
    in-memory store (no rendezvous file is left anywhere)."""
    import torch.distributed as dist
    from datetime import timedelta
    if dist.is_initialized():
        return
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        dist.init_process_group("gloo", init_method="env://", timeout=timedelta(minutes=10))
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def _dp_mean(value: float) -> float:
    """A last-stage loss (already broadcast over the pipeline) averaged over data-parallel replicas."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    if ps.get_data_parallel_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, group=ps.get_data_parallel_group())
    return t.item() / ps.get_data_parallel_world_size()


def cpu_main(argv) -> dict:
    args = parse_cpu_args(argv)
    plan = validate_cpu_args(args)           # every user error before anything starts
    plan.apply()                             # --nvfp4-bf16-from
    recipe = plan.recipe
    overrides = parse_overrides(args.nvfp4_override)
    import torch.distributed as dist

    from .megatron import diagnostics, driver
    from .patches import torch_cpu   # megatron-core on CPU needs the shim (the layers never import it)

    if args.threads:
        torch.set_num_threads(args.threads)
    _check_save_folder(args)                 # an earlier run's checkpoints: resume, --overwrite or refuse
    os.makedirs(args.save, exist_ok=True)
    _init_cpu_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = parallel_layout(args, world)
    main_rank = rank == world - 1          # the last pipeline stage holds the loss (as in Megatron)

    def say(msg):
        if main_rank:
            print(msg, flush=True)

    s = driver.GPTSettings(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads, seq_length=args.seq_length, vocab_size=args.vocab_size,
        micro_batch_size=args.micro_batch_size, num_microbatches=layout["num_microbatches"],
        tp=layout["tp"], pp=layout["pp"], vpp=layout["vpp"], sequence_parallel=args.sequence_parallel,
        use_distributed_optimizer=args.use_distributed_optimizer, overlap_grad_reduce=args.overlap_grad_reduce,
        recipe=args.nvfp4_recipe, attention=args.nvfp4_attention,
        recipe_overrides=overrides, bf16_modules=tuple(p for p in args.nvfp4_bf16_modules.split(",") if p),
        first_last_layers_bf16=args.first_last_layers_bf16,
        num_layers_at_start_in_bf16=args.num_layers_at_start_in_bf16,
        num_layers_at_end_in_bf16=args.num_layers_at_end_in_bf16, bf16=args.bf16, normalization=args.normalization,
        swiglu=args.swiglu, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        clip_grad=args.clip_grad, warmup_steps=args.lr_warmup_iters, train_steps=args.train_iters,
        seed=args.seed)
    torch_cpu.install()
    if args.nvfp4_count_collectives:
        diagnostics.install_collective_counter()
    say(f"megatron_fp4 CPU driver: recipe {recipe.describe()}")
    say(plan.bf16_line() + "; " + ("BF16 parameters and activations (--bf16)" if args.bf16 else
                                   "FP32 parameters and activations (the CPU route's default; the GPU route "
                                   "adds --bf16; pass --bf16 here for BF16)"))
    say(f"parallel: world {world} = TP {s.tp} x PP {s.pp} x DP {layout['dp']}"
        + (f", {s.vpp} virtual stages per pipeline rank" if s.vpp else "")
        + (", sequence parallel" if s.sequence_parallel else "")
        + (", distributed optimizer" if s.use_distributed_optimizer else ""))
    if args.overlap_param_gather:
        say("note: --overlap-param-gather has no effect on the CPU driver")

    driver.initialize_parallel(s)
    from megatron.core import parallel_state as ps
    dp_rank = ps.get_data_parallel_rank()
    if args.mock_data:
        train_it = lambda skip=0: driver.synthetic_batches(s, dp_rank, s.seed, skip)  # noqa: E731
        valid_batches = [b for b, _ in zip(driver.synthetic_batches(s, 0, 99), range(args.eval_iters))]
    else:
        from .data.corpus import load_tokens
        if rank == 0:
            _corpus(args)                                 # builds on first use: one writer
        dist.barrier()
        train_prefix, valid_prefix = _corpus(args)
        train_tokens, valid_tokens = load_tokens(train_prefix), load_tokens(valid_prefix)
        from .megatron.validate import check_tokens_cover_sequence
        check_tokens_cover_sequence(len(train_tokens), s.seq_length, "training", train_prefix)
        check_tokens_cover_sequence(len(valid_tokens), s.seq_length, "validation", valid_prefix)
        say(f"data: {len(train_tokens)} train tokens, {len(valid_tokens)} held-out validation tokens")
        data_seed = s.seed if args.nvfp4_data_seed is None else args.nvfp4_data_seed
        train_it = lambda skip=0: _windows(train_tokens, s, data_seed, dp_rank, layout["dp"], skip)  # noqa: E731
        vit = _windows(valid_tokens, s, 4321)
        valid_batches = (_full_split_batches(valid_tokens, s) if args.full_validation
                         else [next(vit) for _ in range(args.eval_iters)])

    chunks, config = driver.build_model(s)
    from .megatron.precision import announce
    announce(chunks, s.seq_length * s.micro_batch_size, args.save)   # what runs where (issue #19)
    optimizer, scheduler = driver.build_optimizer(s, chunks)
    driver.setup_model_hooks(config, chunks, optimizer)
    oscireset = driver.setup_stabilizers(s, chunks, optimizer)
    if args.nvfp4_perturb_init:
        diagnostics.perturb_initial_weights(chunks, optimizer, args.nvfp4_perturb_init)
    if args.nvfp4_dump_grads:
        diagnostics.install_first_step_grad_dump(optimizer, chunks, args.nvfp4_dump_grads, s.swiglu)
    n_local = sum(p.numel() for m in chunks for p in m.parameters())
    counts = torch.tensor([float(n_local)])
    if ps.get_tensor_model_parallel_world_size() * ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(counts, group=ps.get_model_parallel_group())
    n_params = int(counts.item())
    tokens_per_step = s.micro_batch_size * s.num_microbatches * layout["dp"] * s.seq_length
    say(f"model: {s.num_layers} layers, hidden {s.hidden_size}, ffn {s.ffn_hidden_size}, "
        f"{n_params / 1e6:.2f}M parameters; {tokens_per_step} tokens/step")
    run = _CpuRun(args, s, layout, world, rank, say, chunks, optimizer, scheduler, oscireset, train_it,
                  valid_batches, n_params, tokens_per_step)
    return run.train()


# --------------------------------------------------------------------------------------------------
# CPU route: checkpoints and resume, stops, failures and the run summary
# --------------------------------------------------------------------------------------------------

STOPPED_EXIT_CODE = 3    # stopped before --train-iters (time budget, SIGTERM) after saving a resumable checkpoint
FAILED_EXIT_CODE = 1     # a non-finite loss or grad norm


def _check_save_folder(args) -> None:
    """Start-time checks of the checkpoint flags and of the --save folder (read-only, every rank):
    an earlier run's checkpoint there is resumed (--load SAVE), deleted (--overwrite) or the run is
    refused with one line naming both."""
    from .megatron.checkpoint import check_save_folder
    if args.save_interval is not None and args.save_interval < 1:
        raise UsageError(f"--save-interval must be >= 1, got {args.save_interval}")
    if args.nvfp4_time_budget is not None and not args.nvfp4_time_budget > 0:
        raise UsageError(f"--nvfp4-time-budget must be a positive number of seconds, got {args.nvfp4_time_budget}")
    if args.load and os.path.exists(args.load) and not os.path.isdir(args.load):
        raise UsageError(f"--load {args.load}: not a directory (the --save folder of the run to resume)")
    check_save_folder(args.save, args.load, args.nvfp4_overwrite)


def _run_settings(args, s, layout, world: int) -> dict:
    """What a bit-identical continuation needs unchanged: the driver's settings (model, recipe,
    optimizer, schedule, seed, layout) and the data stream."""
    from dataclasses import asdict
    if args.mock_data:
        data = ["mock"]
    elif args.data_path:
        data = ["indexed", os.path.abspath(args.data_path)]
    else:
        data = ["corpus", os.path.abspath(args.nvfp4_corpus_src) if args.nvfp4_corpus_src else "python-stdlib"]
    return dict(asdict(s), data=data, data_seed=getattr(args, "nvfp4_data_seed", None), world_size=world,
                data_parallel_size=layout["dp"])


class _CpuRun:
    """The CPU route's training loop: resume (--load), periodic and final atomic saves
    (--save-interval), the non-finite loss check, the time budget / SIGTERM stop, the summary."""

    def __init__(self, args, s, layout, world, rank, say, chunks, optimizer, scheduler, oscireset, train_it,
                 valid_batches, n_params, tokens_per_step):
        self.args, self.s, self.layout, self.world, self.rank, self.say = args, s, layout, world, rank, say
        self.chunks, self.optimizer, self.scheduler, self.oscireset = chunks, optimizer, scheduler, oscireset
        self.train_it, self.valid_batches = train_it, valid_batches
        self.n_params, self.tokens_per_step = n_params, tokens_per_step
        self.main_rank = rank == world - 1
        self.save_root = os.path.abspath(args.save)
        self.settings = _run_settings(args, s, layout, world)
        self.summary_path = args.nvfp4_summary or os.path.join(args.save, "summary.json")
        self.plot_path = os.path.join(args.save, "loss.png")
        # this run's history; a resumed run starts from the checkpoint's (all earlier segments)
        self.history = {"losses": [], "valid": [], "oscireset_events": [], "outcontrol": {}, "segments": []}
        self.step_times: list = []
        self.start_iteration = 0
        self.last_saved: Optional[int] = None
        self.stop_budget = args.nvfp4_time_budget
        self._signalled = False
        from .megatron import driver
        from .megatron.quant_stats import StatsReporter
        # --nvfp4-stats-interval (issue #19): quantization statistics after the progress line
        self.quant_stats = StatsReporter(args.nvfp4_stats_interval, args.save, rank, log=self.say, stabilizers=lambda: (
            [] if self.oscireset is None else self.oscireset.history, driver.outcontrol_stats(self.chunks)))

    # -- setup ------------------------------------------------------------------------------------
    def _tidy_save_folder(self) -> None:
        import torch.distributed as dist

        from .megatron import checkpoint
        if self.rank == 0:
            if self.args.nvfp4_overwrite:
                removed = checkpoint.clear_save_folder(self.save_root)
                if removed:
                    print(f"--overwrite: removed {', '.join(removed)} from {self.save_root}", flush=True)
            leftovers = checkpoint.remove_leftovers(self.save_root)
            if leftovers:
                print(f"removed unfinished checkpoint saves of a killed run: {', '.join(leftovers)}", flush=True)
        dist.barrier()

    def _resume(self) -> None:
        from .megatron import checkpoint
        if not self.args.load:
            return
        resumed = checkpoint.load(self.args.load, self.chunks, self.optimizer, self.scheduler, self.settings,
                                  self.s.use_distributed_optimizer)
        if resumed is None:
            self.say(f"--load {self.args.load}: no checkpoint there ({checkpoint.TRACKER} missing): starting "
                     "from iteration 0")
            return
        self.start_iteration = resumed.iteration
        self.history = {k: (list(v) if isinstance(v, list) else dict(v)) for k, v in resumed.history.items()}
        if os.path.abspath(self.args.load) == self.save_root:
            self.last_saved = resumed.iteration
        self.say(f"resumed from {resumed.directory}: iteration {resumed.iteration} of {self.s.train_steps} "
                 f"({resumed.iteration * self.layout['global_batch_size']} samples consumed)")

    def _install_signal_handler(self) -> None:
        if not self.args.exit_signal_handler:
            return
        import signal

        def on_sigterm(signum, frame):
            self._signalled = True
        signal.signal(signal.SIGTERM, on_sigterm)

    # -- the loop -----------------------------------------------------------------------------------
    def train(self) -> dict:
        from .megatron import driver
        s = self.s
        self._tidy_save_folder()
        self._resume()
        if self.start_iteration >= s.train_steps:
            self.say(f"the checkpoint is at iteration {self.start_iteration}, the end of the run (--train-iters "
                     f"{s.train_steps}): nothing to train")
            return self._existing_summary()
        self._install_signal_handler()
        iterators = [self.train_it(self.start_iteration * s.num_microbatches) for _ in self.chunks]
        t_start = time.perf_counter()
        done, stopped, failure = self.start_iteration, None, None
        for it in range(self.start_iteration, s.train_steps):
            t0 = time.perf_counter()
            loss, grad_norm = driver.train_step(s, self.chunks, self.optimizer, self.scheduler, iterators, it)
            loss = _dp_mean(driver.broadcast_from_last_stage(loss))
            dt = time.perf_counter() - t0
            done = it + 1
            grad_norm = None if grad_norm is None else float(grad_norm)    # None: no norm computed (no clipping)
            self.history["losses"].append(loss)
            self.step_times.append(dt)
            if done % self.args.log_interval == 0 or it == self.start_iteration:
                tokens = self.tokens_per_step
                self.say(f" iteration {done:6d}/{s.train_steps:6d} | consumed tokens: {done * tokens:9d} | "
                         f"elapsed time per iteration (ms): {dt * 1000:.1f} | tokens/s: {tokens / dt:.0f} | "
                         f"learning rate: {self.scheduler.get_lr(self.optimizer.param_groups[0]):.3E} | "
                         f"lm loss: {loss:.6E} | grad norm: {math.nan if grad_norm is None else grad_norm:.3f}")
            self.quant_stats.finish(done)
            if not (math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))):
                if self.args.check_for_nan_in_loss_and_grad:
                    failure = self._failure_message(done, loss, grad_norm)
                    break
                self.say(f"iteration {done}: non-finite lm loss {loss} / grad norm {grad_norm}; training on "
                         "(--no-check-for-nan-in-loss-and-grad)")
            if self.args.eval_iters > 0 and (done % self.args.eval_interval == 0 or done == s.train_steps):
                self._evaluate(done)
            if done == s.train_steps:
                break
            if self.args.save_interval and done % self.args.save_interval == 0:
                self._save(done)
            stopped = self._stop_requested(time.perf_counter() - t_start)
            if stopped:
                if self.args.eval_iters > 0 and (not self.history["valid"] or self.history["valid"][-1][0] != done):
                    self._evaluate(done)
                break
        train_time = time.perf_counter() - t_start
        if failure is None and done != self.last_saved:
            self._save(done)
        summary = self._summary(done, train_time, stopped, failure)
        if failure is not None:
            if self.rank == 0:         # as the one-line user errors (errors.py); every rank knows the loss
                print(f"megatron_fp4: error: {failure}", file=sys.stderr, flush=True)
            raise SystemExit(FAILED_EXIT_CODE)
        if stopped:
            self.say(f"stopped by {stopped} at iteration {done} of {s.train_steps}: the run did not finish; "
                     f"checkpoint saved to {self.last_saved_dir}; resume with --load {self.save_root}")
            raise SystemExit(STOPPED_EXIT_CODE)
        return summary

    def _evaluate(self, done: int) -> None:
        from .megatron import driver
        vloss = driver.broadcast_from_last_stage(driver.evaluate(self.s, self.chunks, self.valid_batches))
        self.history["valid"].append((done, vloss))
        ppl = math.exp(vloss) if math.isfinite(vloss) and vloss < 700 else math.nan
        self.say(f" validation loss at iteration {done}: {vloss:.6E} | PPL: {ppl:.3f}")

    def _stop_requested(self, elapsed: float) -> Optional[str]:
        """The time budget or SIGTERM, decided together by all ranks (one MAX all-reduce per
        iteration, only when either is enabled), so that every rank stops after the same iteration."""
        if self.stop_budget is None and not self.args.exit_signal_handler:
            return None
        import torch.distributed as dist
        flags = torch.tensor([float(self.stop_budget is not None and elapsed > self.stop_budget),
                              float(self._signalled)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[1]:
            return "SIGTERM (--exit-signal-handler)"
        if flags[0]:
            return f"time budget ({self.stop_budget:g} s of training, --nvfp4-time-budget)"
        return None

    def _failure_message(self, done: int, loss: float, grad_norm: float) -> str:
        what = ", ".join(f"{name} {value}" for name, value in (("lm loss", loss), ("grad norm", grad_norm))
                         if value is not None and not math.isfinite(value))
        if self.last_saved is not None:
            kept = (f"the newest checkpoint, iteration {self.last_saved} in {self.save_root}, is from before it "
                    f"(resume with --load {self.save_root})")
        else:
            kept = "no checkpoint was saved (--save-interval N keeps one every N iterations)"
        first = self.quant_stats.first_nonfinite
        where = f" (first non-finite quantized operand: {first})" if first else ""
        return (f"iteration {done} of {self.s.train_steps}: non-finite {what}{where}; training stopped and this "
                f"state was not saved; {kept}; pass --no-check-for-nan-in-loss-and-grad to train on regardless")

    # -- checkpoints --------------------------------------------------------------------------------
    @property
    def last_saved_dir(self) -> Optional[str]:
        from .megatron.checkpoint import iteration_dir
        return None if self.last_saved is None else iteration_dir(self.save_root, self.last_saved)

    def _segment(self, done: int) -> dict:
        steady = self.step_times[1:] or self.step_times
        return {"first_iteration": self.start_iteration + 1, "last_iteration": done, "device": "cpu",
                "world_size": self.world, "median_step_s": float(np.median(steady)) if steady else None}

    def _history_snapshot(self, done: int) -> dict:
        from .megatron import driver
        events = self.history["oscireset_events"] + ([] if self.oscireset is None else list(self.oscireset.history))
        outcontrol = dict(self.history["outcontrol"], **driver.outcontrol_stats(self.chunks))
        return {"losses": list(self.history["losses"]), "valid": list(self.history["valid"]),
                "oscireset_events": events, "outcontrol": outcontrol,
                "segments": self.history["segments"] + [self._segment(done)]}

    def _megatron_args(self, done: int) -> dict:
        """Megatron's names for the run's shape and position (the checkpoint's `args`)."""
        a, s = self.args, self.s
        return {"iteration": done, "train_iters": s.train_steps, "consumed_train_samples":
                done * self.layout["global_batch_size"], "micro_batch_size": s.micro_batch_size,
                "global_batch_size": self.layout["global_batch_size"], "seq_length": s.seq_length,
                "num_layers": s.num_layers, "hidden_size": s.hidden_size, "ffn_hidden_size": s.ffn_hidden_size,
                "num_attention_heads": s.num_attention_heads, "vocab_size": s.vocab_size, "seed": s.seed,
                "tensor_model_parallel_size": s.tp, "pipeline_model_parallel_size": s.pp,
                "virtual_pipeline_model_parallel_size": s.vpp, "data_parallel_size": self.layout["dp"],
                "world_size": self.world, "sequence_parallel": s.sequence_parallel,
                "use_distributed_optimizer": s.use_distributed_optimizer, "bf16": s.bf16, "ckpt_format": "torch_dist",
                "nvfp4_recipe": a.nvfp4_recipe, "nvfp4_override": list(a.nvfp4_override)}

    def _save(self, done: int) -> None:
        from .megatron import checkpoint
        run = {"settings": self.settings, "args": self._megatron_args(done)}
        path = checkpoint.save(self.save_root, done, self.chunks, self.optimizer, self.scheduler, run,
                               self._history_snapshot(done), self.s.use_distributed_optimizer)
        self.last_saved = done
        self.say(f" saved checkpoint at iteration {done} to {path}")

    # -- summary ------------------------------------------------------------------------------------
    def _existing_summary(self) -> dict:
        if os.path.isfile(self.summary_path):
            with open(self.summary_path) as fh:
                return json.load(fh)
        return {}

    def _summary(self, done: int, train_time: float, stopped: Optional[str], failure: Optional[str]) -> dict:
        from .megatron import diagnostics
        from .megatron.state import format_comm_stats
        from .pretrain_support import write_json
        hist = self._history_snapshot(done)
        losses = hist["losses"]
        mean_step = float(np.mean(self.step_times)) if self.step_times else None
        from . import summary as schema
        s = self.s
        report = diagnostics.comm_report()
        summary = schema.make(
            route="cpu", recipe=self.args.nvfp4_recipe, finished=failure is None and stopped is None,
            stopped_by="non-finite loss or grad norm" if failure else stopped, error=failure,
            iterations=done, train_iters=s.train_steps, resumed_from=self.start_iteration or None,
            losses=[[i + 1, v] for i, v in enumerate(losses)], valid=hist["valid"],
            median_step_s=hist["segments"][-1]["median_step_s"], mean_step_s=mean_step,
            train_time_s=round(train_time, 1), tokens_per_step=self.tokens_per_step,
            tokens_per_s=self.tokens_per_step / mean_step if mean_step else None, parameters=self.n_params,
            peak_mem_gib=None, device="cpu", world_size=self.world,
            layout={"tp": self.layout["tp"], "pp": self.layout["pp"], "vpp": self.layout["vpp"],
                    "dp": self.layout["dp"], "sequence_parallel": s.sequence_parallel,
                    "distributed_optimizer": s.use_distributed_optimizer},
            model={"num_layers": s.num_layers, "hidden_size": s.hidden_size, "ffn_hidden_size": s.ffn_hidden_size,
                   "num_attention_heads": s.num_attention_heads, "seq_length": s.seq_length,
                   "micro_batch_size": s.micro_batch_size, "global_batch_size": self.layout["global_batch_size"]},
            segments=hist["segments"], checkpoint=self.last_saved_dir, plot=self.plot_path,
            oscireset_events=hist["oscireset_events"],
            outcontrol={k: {kk: vv for kk, vv in v.items() if kk != "channels_selected"}
                        for k, v in hist["outcontrol"].items()},
            comm={k: report[k] for k in ("collectives", "plugin_gathers") if k in report})
        if self.main_rank:
            _plot(hist, self.plot_path, f"GPT {self.n_params / 1e6:.1f}M, {self.args.nvfp4_recipe}, "
                                        + ("mock data" if self.args.mock_data else "byte-level corpus"))
            write_json(self.summary_path, summary)
            print(format_comm_stats(), flush=True)
            brief = {k: v for k, v in summary.items()
                     if k not in ("losses", "oscireset_events", "outcontrol", "segments", "valid", "comm", "model")}
            print(f"done: {brief}", flush=True)
        return summary


def use_gpu_route(argv) -> bool:
    """The GPU route needs CUDA and no --nvfp4-cpu; everything else goes to the CPU driver."""
    return torch.cuda.is_available() and torch.cuda.device_count() > 0 and "--nvfp4-cpu" not in argv


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    from .megatron.validate import check_renamed_flags
    check_renamed_flags(argv)
    if use_gpu_route(argv):
        return _gpu_main(argv)
    return cpu_main(argv)


def cli(argv=None) -> int:
    """Console script `megatron-fp4-pretrain` (same as `python -m megatron_fp4.pretrain_gpt`): a user
    error is one line on rank 0 and exit status 2 (--nvfp4-debug-errors / MEGATRON_FP4_DEBUG=1 for the
    traceback; megatron_fp4/errors.py)."""
    from .errors import run_reporting_user_errors
    argv = list(sys.argv[1:] if argv is None else argv)
    run_reporting_user_errors(lambda: main(argv), argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
