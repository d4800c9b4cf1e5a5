"""The GPU route of `python -m megatron_fp4.pretrain_gpt`: what `megatron.training.pretrain` needs.

Megatron-LM's own `pretrain_gpt.py` is not in the megatron-core wheel, so the plugin provides:

- `launcher_argv(argv)`: the user's flags plus defaults for anything left out (the main job's small
  GPT, byte-level NullTokenizer, the Python-stdlib corpus, `--transformer-impl local`) and the
  switches that megatron-core needs when apex / Transformer Engine kernels are absent;
- `build_config(argv)`: Megatron's argument parsing with the plugin flags, then the config container
  (`NVFP4TransformerConfig`, plugin spec `megatron_fp4.spec.gpt_layer_spec`);
- `train_valid_test_datasets_provider`: GPTDataset / MockGPTDataset through
  BlendedMegatronDatasetBuilder (indexed datasets from `--data-path`, per-split paths, or
  `--mock-data`);
- `forward_step`: batch -> GPTModel -> masked token loss (per-token averaging by Megatron), and
  `set_iteration` for the plugin's random streams;
- `TrainingHistory`: per-iteration loss / step time / peak memory recorded from Megatron's loop, for
  the run summary and the loss plot.

Everything up to `pretrain()` runs on CPU (tests/megatron/test_gpu_route.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from functools import partial
from typing import Optional

import numpy as np
import torch

from .megatron.state import set_iteration

log = logging.getLogger(__name__)

DATA_FLAGS = ("--mock-data", "--data-path", "--train-data-path", "--valid-data-path", "--test-data-path",
              "--data-args-path", "--per-split-data-args-path")


def _has(argv, flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _value(argv, flag: str, default=None):
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return default


def missing_kernel_flags(argv) -> list:
    """Switches off megatron-core fusions whose kernels come from apex or Transformer Engine when
    those are not installed (megatron would otherwise fail at model build or first step)."""
    import importlib.util as iu
    have_te = iu.find_spec("transformer_engine") is not None
    extra = []
    # masked softmax: megatron's fused path imports apex's scaled_masked_softmax_cuda
    if iu.find_spec("scaled_masked_softmax_cuda") is None and not _has(argv, "--no-masked-softmax-fusion"):
        extra.append("--no-masked-softmax-fusion")
    # RoPE fusion asserts TE's fused_apply_rotary_pos_emb exists
    if not have_te and not _has(argv, "--no-rope-fusion"):
        extra.append("--no-rope-fusion")
    # the stock LM head refuses gradient-accumulation fusion without apex's wgrad kernel or TE
    if (iu.find_spec("fused_weight_gradient_mlp_cuda") is None and not have_te
            and not _has(argv, "--no-gradient-accumulation-fusion")):
        extra.append("--no-gradient-accumulation-fusion")
    if iu.find_spec("fast_layer_norm") is None and not _has(argv, "--no-persist-layer-norm"):
        extra.append("--no-persist-layer-norm")
    return extra


def launcher_argv(argv) -> list:
    """The argument list handed to Megatron: the user's flags, then defaults for what is missing."""
    argv = list(argv)
    out = list(argv)
    from .defaults import MAIN_JOB, MAIN_JOB_SWITCHES, flag as flag_of
    for name, value in MAIN_JOB.items():
        if name == "vocab_size":
            continue                            # NullTokenizer only (below)
        if not _has(argv, flag_of(name)):
            out += [flag_of(name), str(value)]
    if not _has(argv, "--max-position-embeddings"):
        out += ["--max-position-embeddings", _value(out, "--seq-length")]
    for name in MAIN_JOB_SWITCHES:
        if not _has(argv, flag_of(name)):
            out.append(flag_of(name))
    if not (_has(argv, "--bf16") or _has(argv, "--fp16") or _has(argv, "--nvfp4-fp32")):
        out.append("--bf16")
    tokenizer = _value(out, "--tokenizer-type")
    if tokenizer == "NullTokenizer" and not _has(argv, "--vocab-size"):
        out += ["--vocab-size", str(MAIN_JOB["vocab_size"])]          # byte-level tokens
    if not any(_has(argv, f) for f in DATA_FLAGS):
        # the main job's data: the corpus builder's indexed datasets, built on first use
        save = _value(argv, "--save") or "nvfp4_run"
        if not _has(argv, "--save"):
            out += ["--save", save]
        corpus_dir = os.path.join(save, "corpus")
        out += ["--train-data-path", os.path.join(corpus_dir, "train"),
                "--valid-data-path", os.path.join(corpus_dir, "valid"),
                "--test-data-path", os.path.join(corpus_dir, "valid"), "--nvfp4-corpus-dir", corpus_dir]
        if tokenizer == "NullTokenizer" and not _has(argv, "--null-tokenizer-eod-id"):
            from .data.corpus import EOD
            out += ["--null-tokenizer-eod-id", str(EOD)]
    if _has(out, "--save") and not _has(argv, "--save-interval"):
        # megatron's end-of-training save computes iteration % save_interval
        out += ["--save-interval", _value(out, "--train-iters")]
    if (_value(argv, "--nvfp4-attention", "sdpa") == "sdpa" and not _has(argv, "--reset-attention-mask")
            and not _has(argv, "--no-create-attention-mask-in-dataloader")):
        # the dataloader's mask would only repeat causality; without it sdpa runs the flash kernel
        out.append("--no-create-attention-mask-in-dataloader")
    return out + missing_kernel_flags(argv)


def _stats_interval(text: str) -> int:
    """--nvfp4-stats-interval N: an integer >= 1 (0, the default, is off)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 1:
        raise argparse.ArgumentTypeError(f"needs an integer >= 1 (statistics every N iterations), got {text!r}; "
                                         "leave the flag out to turn the statistics off")
    return value


def add_diagnostic_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Measurement flags of the launcher (both routes; megatron_fp4/megatron/diagnostics.py)."""
    g = parser.add_argument_group("megatron_fp4 diagnostics")
    g.add_argument("--nvfp4-count-collectives", action="store_true",
                   help="count the bytes of every torch.distributed collective per iteration and process-group "
                        "role (tp/dp/pp) into the run summary")
    g.add_argument("--nvfp4-dump-grads", default=None, metavar="PATH",
                   help="write the first optimizer step's reduced gradients, gathered to the TP=1 layout, "
                        "and the plugin layers' random-stream keys to PATH (torch.save; pipeline-parallel size 1)")
    g.add_argument("--nvfp4-perturb-init", type=float, default=0.0, metavar="EPS",
                   help="scale every initial weight matrix by (1 + EPS): a last-bit perturbation, to measure how "
                        "far FP4 rounding amplifies reduction-order differences (FP32 parameters only)")
    g.add_argument("--nvfp4-stats-interval", type=_stats_interval, default=0, metavar="N",
                   help="every N iterations: per plugin linear and GEMM operand the amax, flushed and saturated "
                        "block fractions, relative quantization error (sampled rows) and MS-EDEN correction "
                        "range, to <save>/nvfp4_stats.jsonl, TensorBoard / W&B and the log; the first operand "
                        "holding a NaN / Inf is named (megatron_fp4/stats.py; default 0: off)")
    g.add_argument("--nvfp4-data-seed", type=int, default=None, metavar="SEED",
                   help="seed of the training data order (default: --seed, which also seeds the initialisation): "
                        "runs that differ only in --seed then see the same data")
    return parser


def add_launcher_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The plugin flags plus the launcher's own (accepted by Megatron's parser)."""
    from .patches.megatron_args import add_plugin_args
    if not any(a.dest == "nvfp4_recipe" for a in parser._actions):
        add_plugin_args(parser)
    if not any(a.dest == "nvfp4_dump_grads" for a in parser._actions):
        add_diagnostic_args(parser)
    g = parser.add_argument_group("megatron_fp4 launcher")
    g.add_argument("--nvfp4-corpus-dir", default=None,
                   help="build the byte-level corpus here on first use (set by the launcher for the main job)")
    g.add_argument("--nvfp4-corpus-src", default=None, help="directory of text files (default: Python stdlib)")
    g.add_argument("--nvfp4-summary", default=None,
                   help="write the run summary (JSON) here and the loss plot beside it "
                        "(default: <save>/summary.json when --save is given)")
    g.add_argument("--nvfp4-cpu", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--overwrite", "--nvfp4-overwrite", dest="nvfp4_overwrite", action="store_true",
                   help="start fresh in a --save folder that holds an earlier run's checkpoints (deletes them, its "
                        "summary and plot); without it such a run is refused unless --load resumes it")
    g.add_argument("--nvfp4-time-budget", type=float, default=None, metavar="SECONDS",
                   help="stop after this many seconds (Megatron's --exit-duration-in-mins, counted from the start "
                        "of the program), save a checkpoint, say so and exit with status 3 (default: no budget)")
    g.add_argument("--nvfp4-fp32", action="store_true",
                   help="FP32 parameters and activations (the launcher adds --bf16 when neither --bf16 nor --fp16 "
                        "is given)")
    if not any(a.dest == "null_tokenizer_eod_id" for a in parser._actions):
        # megatron's build_tokenizer reads args.null_tokenizer_eod_id but 0.19 has no flag for it
        g.add_argument("--null-tokenizer-eod-id", type=int, default=None,
                       help="end-of-document id of NullTokenizer (default vocab_size-1; the corpus uses 0)")
    return parser


def _plot(history, path, title):
    """The loss curve as a PNG, written atomically (a kill never leaves a cut file)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .megatron.checkpoint import replace_file
    losses = [math.nan if v is None else v for v in history["losses"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), losses, label="train loss", lw=1)
    if history.get("valid"):
        xs, ys = zip(*history["valid"])
        ax.plot(xs, [math.nan if v is None else v for v in ys], "o-", label="validation loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats/byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    replace_file(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def single_process_env() -> None:
    """`python -m megatron_fp4.pretrain_gpt` without torchrun: give torch.distributed's env://
    rendezvous a one-process world (torchrun sets these variables itself)."""
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def build_config(argv):
    """Parse Megatron's flags with the plugin's and build the config container for `pretrain()`.

    Returns (args, cfg). Sets Megatron's global args (parse_and_validate_args does).
    """
    import sys

    from megatron.training.argument_utils import (core_transformer_config_from_args, gpt_config_from_args,
                                                  pretrain_cfg_container_from_args)
    from megatron.training.arguments import parse_and_validate_args

    from .megatron.config import NVFP4TransformerConfig, check_supported_args
    from .megatron.validate import parse_overrides, plugin_recipe
    from .spec import gpt_layer_spec

    full = launcher_argv(argv)
    saved = sys.argv
    sys.argv = [saved[0] if saved else "pretrain_gpt", *full]
    try:
        args = parse_and_validate_args(extra_args_provider=add_launcher_args)
    finally:
        sys.argv = saved
    check_supported_args(args)
    if args.nvfp4_time_budget is not None:
        if not args.nvfp4_time_budget > 0:
            from .errors import UsageError
            raise UsageError(f"--nvfp4-time-budget must be a positive number of seconds, got {args.nvfp4_time_budget}")
        if not args.exit_duration_in_mins:
            args.exit_duration_in_mins = args.nvfp4_time_budget / 60.0   # Megatron saves, then exits
    if getattr(args, "spec", None):
        raise ValueError("megatron_fp4.pretrain_gpt sets the layer spec itself "
                         "(megatron_fp4.spec.gpt_layer_spec); drop --spec")
    plugin_recipe(args)              # unknown recipe / bad YAML / bad knob: fail before any setup
    overrides = parse_overrides(args.nvfp4_override)
    bf16_modules = tuple(p for p in args.nvfp4_bf16_modules.split(",") if p)
    tcfg = core_transformer_config_from_args(args, config_class=NVFP4TransformerConfig)
    tcfg.nvfp4_recipe, tcfg.nvfp4_overrides, tcfg.nvfp4_bf16_modules = args.nvfp4_recipe, overrides, bf16_modules
    model_cfg = gpt_config_from_args(args, config=tcfg)
    model_cfg.transformer_layer_spec = gpt_layer_spec
    if args.use_cpu_initialization and not getattr(args, "use_torch_fsdp2", False):
        model_cfg.pre_wrap_hooks.append(place_cpu_initialized_chunks_on_gpu)
    cfg = pretrain_cfg_container_from_args(args, model_cfg=model_cfg)
    return args, cfg


def place_cpu_initialized_chunks_on_gpu(chunks):
    """Pre-wrap hook for --use-cpu-initialization on GPUs. `training.get_model` moves CPU-initialized
    weights to the GPU, but the config-container builder that `pretrain(cfg, ...)` uses in
    megatron-core 0.19 (training/models/dist_utils.py) skips the move whenever use_cpu_initialization
    is set, and the first forward fails with "index is on cuda:0, ... other tensors on cpu" (found by
    the multi-GPU command's gradient runs on an H100). The weights are drawn on the CPU as before
    (identical full masters at every TP size: what the flag is for) and moved before wrapping."""
    if torch.cuda.is_available():
        for chunk in chunks:
            chunk.cuda(torch.cuda.current_device())
    return chunks


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------

def _pipeline_edge(vp_stage: Optional[int]) -> bool:
    """Only the first and last pipeline stages read data (inputs / labels); middle stages get None."""
    from megatron.core import parallel_state as ps
    if not ps.model_parallel_is_initialized():
        return True
    return (ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
            or ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage))


def ensure_corpus(args) -> None:
    """Build the byte-level corpus for the main job once (global rank 0), everyone else waits."""
    corpus_dir = getattr(args, "nvfp4_corpus_dir", None)
    if not corpus_dir:
        return
    import torch.distributed as dist
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        from .data import corpus
        corpus.ensure(corpus_dir, getattr(args, "nvfp4_corpus_src", None))
    if dist.is_initialized():
        dist.barrier()


def gpt_dataset_config(args, tokenizer):
    """GPTDatasetConfig from Megatron's data flags (mock data when no path is given)."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.training.utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    if not args.mock_data and blend is None and blend_per_split is None:
        raise ValueError("no training data: pass --mock-data, --data-path PREFIX..., or "
                         "--train-data-path/--valid-data-path/--test-data-path "
                         "(build byte-level datasets with `python -m megatron_fp4.data.corpus`)")
    if args.mock_data and (blend is not None or blend_per_split is not None):
        raise ValueError("--mock-data cannot be combined with --data-path / --*-data-path")
    return GPTDatasetConfig(
        # the data order: --nvfp4-data-seed when given, so runs that differ only in --seed see the same data
        random_seed=args.seed if getattr(args, "nvfp4_data_seed", None) is None else args.nvfp4_data_seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        multiple_validation_sets=args.multiple_validation_sets,
        full_validation=args.full_validation,
        num_dataset_builder_threads=args.num_dataset_builder_threads,
        path_to_cache=args.data_cache_path,
        mmap_bin_files=args.mmap_bin_files,
        tokenizer=tokenizer,
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
        context_parallel_size=args.context_parallel_size,
        data_parallel_size=args.data_parallel_size,
    )


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """(train, valid, test) GPT datasets; None on pipeline stages that read no data."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset
    from megatron.training import get_args, get_tokenizer

    args = get_args()
    ensure_corpus(args)
    config = gpt_dataset_config(args, get_tokenizer())
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    if not args.mock_data:
        _check_vocab(args, config)
    return BlendedMegatronDatasetBuilder(dataset_type, train_val_test_num_samples,
                                         partial(_pipeline_edge, vp_stage), config).build()


# Every rank builds its own datasets and loaders (megatron-core datasets are distributed-aware), so
# each tensor-parallel rank reads the same batch itself and no broadcast is needed in get_batch.
train_valid_test_datasets_provider.is_distributed = True


def _check_vocab(args, config) -> None:
    """Token ids >= the model's vocabulary would index past the embedding: refuse byte-level data
    with a smaller vocab early, with a message, instead of a device-side assert."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    vocab = getattr(args, "padded_vocab_size", None) or args.vocab_size
    prefixes = []
    for blend in [config.blend] + list(config.blend_per_split or []):
        if blend is not None:
            prefixes += list(blend[0])
    for prefix in prefixes:
        ds = IndexedDataset(prefix, mmap=True)
        if ds.index.dtype == np.uint8 and vocab is not None and vocab < 256:
            raise ValueError(f"{prefix}: byte-level tokens (uint8) need --vocab-size >= 256, got {vocab}")


# --------------------------------------------------------------------------------------------------
# Forward step
# --------------------------------------------------------------------------------------------------

BATCH_KEYS = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")


def get_batch(data_iterator, vp_stage=None, device=None):
    """The micro-batch on this rank's device; all-None on middle pipeline stages.

    Context parallelism splits the sequence after loading (megatron-core's helper)."""
    if data_iterator is None or not _pipeline_edge(vp_stage):
        return {k: None for k in BATCH_KEYS}
    sample = next(data_iterator)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    batch = {k: (sample[k].to(device, non_blocking=True) if sample.get(k) is not None else None)
             for k in BATCH_KEYS}
    from megatron.core import parallel_state as ps
    if ps.model_parallel_is_initialized() and ps.get_context_parallel_world_size() > 1:
        from megatron.core.utils import get_batch_on_this_cp_rank
        batch = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=ps.get_context_parallel_group())
    return batch


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor, check_nan: bool = True):
    """Sum of masked per-token losses and the token count: Megatron divides by the count (per-token
    averaging over the global batch, `lm loss` in the logs)."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    total = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    if check_nan:
        from megatron.core.rerun_state_machine import get_rerun_state_machine
        from . import stats       # --nvfp4-stats-interval: name the first non-finite operand (a sync, then only)
        where = stats.first_nonfinite_so_far() if stats.active else None
        get_rerun_state_machine().validate_result(
            result=total, rejection_func=torch.isnan, tolerance=0.0, fatal=True,
            message="megatron_fp4: NaN in the forward loss" + (f" (first non-finite quantized operand: {where})"
                                                               if where else ""))
    report = torch.stack([total.detach().clone(), num_tokens.detach().float()])
    return total, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model, vp_stage: Optional[int] = None):
    """One micro-batch forward; returns (output, loss function) as Megatron's schedules expect."""
    from megatron.training import get_args, get_timers
    args = get_args()
    # the plugin's random streams are keyed by the optimizer step (state.py)
    set_iteration(int(getattr(args, "curr_iteration", 0) or 0))
    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    if vp_stage is None:
        from megatron.core.utils import get_attr_wrapped_model
        try:
            vp_stage = get_attr_wrapped_model(model, "vp_stage")
        except RuntimeError:            # a model without virtual stages
            vp_stage = None
    batch = get_batch(data_iterator, vp_stage)
    timers("batch-generator").stop()
    output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                   labels=batch["labels"], loss_mask=batch["loss_mask"])
    check_nan = bool(getattr(args, "check_for_nan_in_loss_and_grad", True))
    return output, partial(loss_func, batch["loss_mask"], check_nan=check_nan)


# --------------------------------------------------------------------------------------------------
# Run history (loss curve, step times, memory) for the summary and the plot
# --------------------------------------------------------------------------------------------------

class TrainingHistory:
    """Records, from Megatron's training loop (patches/megatron_logging.py), each iteration's reduced
    `lm loss`, the wall time between iterations (device synchronized) and peak memory, and the
    validation losses."""

    def __init__(self, summary_path: Optional[str] = None, every: int = 10):
        self.summary_path, self.every = summary_path, every
        self.records: list = []
        self.valid: list = []          # (iteration, validation lm loss) from Megatron's evaluation
        self._last = None
        self._installed = False
        # losses / validation points / segments of earlier segments that this one continues
        self._prior = {"losses": [], "valid": [], "segments": []}
        # A run resumed from a checkpoint (--load) continues the summary that its earlier segments
        # left at summary_path: read now, kept up to where this segment starts (see _continue).
        self._earlier = None
        if summary_path and os.path.isfile(summary_path):
            try:
                with open(summary_path) as fh:
                    self._earlier = json.load(fh)
            except (OSError, ValueError):
                log.warning("run summary %s is unreadable; a resumed run starts a new one", summary_path)

    def install(self) -> "TrainingHistory":
        from .patches import megatron_logging
        megatron_logging.install(self.record, self._record_validation)
        self._last = time.perf_counter()
        self._installed = True
        return self

    def _record_validation(self, total_loss_dict) -> None:
        if "lm loss" in total_loss_dict:
            iteration = self.records[-1]["iteration"] if self.records else 0
            self.valid.append((iteration, float(total_loss_dict["lm loss"])))

    def _continue(self, first_iteration: int) -> None:
        """At this segment's first iteration: keep the earlier summary's losses and validation points
        before it (a checkpoint at iteration i was saved after i's evaluation, so the segment starts at
        i + 1; anything recorded after the checkpoint is trained again and replaced). A segment that
        starts at iteration 1 is a fresh run: the earlier summary is dropped."""
        earlier, self._earlier = self._earlier, None
        if not earlier or first_iteration <= 1:
            return
        keep = lambda points: [(int(i), v) for i, v in points if int(i) < first_iteration]
        segments = earlier.get("segments") or [{
            "first_iteration": 1, "last_iteration": first_iteration - 1, "device": earlier.get("device"),
            "median_step_s": earlier.get("median_step_s")}]
        self._prior = {"losses": keep(earlier.get("losses", [])), "valid": keep(earlier.get("valid", [])),
                       "segments": [dict(seg, last_iteration=min(seg["last_iteration"], first_iteration - 1))
                                    for seg in segments if seg["first_iteration"] < first_iteration]}
        log.info("resumed at iteration %d: the run summary keeps %d earlier loss points", first_iteration,
                 len(self._prior["losses"]))

    def record(self, loss_dict, iteration, learning_rate=None) -> None:
        if not self.records:
            self._continue(int(iteration))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        step_s = now - self._last if self._last is not None else float("nan")
        self._last = now
        loss = loss_dict.get("lm loss") if loss_dict else None
        self.records.append({
            "iteration": int(iteration),
            "loss": float(loss) if loss is not None else None,
            "step_s": step_s,
            "lr": float(learning_rate) if learning_rate is not None else None,
            "max_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        })
        if self.summary_path and self.every and iteration % self.every == 0:
            # a run cut short (time limit) still leaves its figures
            from megatron.training import get_args
            write_summary(self, get_args(), self.summary_path, plot=False)

    def summary(self, warmup: int = 10) -> dict:
        """The whole run so far: earlier segments (a resumed run) and this one. Step time, peak
        memory and device are this segment's; `segments` lists each segment's."""
        import statistics
        steps = [r["step_s"] for r in self.records[warmup:] if not math.isnan(r["step_s"])]
        prior = self._prior
        losses = prior["losses"] + [(r["iteration"], r["loss"]) for r in self.records if r["loss"] is not None]
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        median = statistics.median(steps) if steps else None
        segments = list(prior["segments"])
        if self.records:
            segments.append({"first_iteration": self.records[0]["iteration"],
                             "last_iteration": self.records[-1]["iteration"], "device": device,
                             "median_step_s": median})
        return {
            "iterations": self.records[-1]["iteration"] if self.records else 0,
            "losses": losses,
            "valid": prior["valid"] + list(self.valid),
            "median_step_s": median,
            "mean_step_s": sum(steps) / len(steps) if steps else None,
            "warmup_excluded": warmup,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            "device": device,
            "segments": segments,
        }


def write_summary(history: TrainingHistory, args, path: Optional[str], plot: bool = True,
                  stopped_by: Optional[str] = None) -> Optional[dict]:
    """summary.json (megatron_fp4/summary.py, the schema both routes write) + loss plot, written by the
    last global rank (it holds the last pipeline stage's reduced loss)."""
    if path is None:
        return None
    if int(os.environ.get("RANK", "0")) != int(os.environ.get("WORLD_SIZE", "1")) - 1:
        return None
    from . import summary as schema
    from .megatron.diagnostics import comm_report
    from .megatron.optimizer_hooks import stabilizer_report
    run = history.summary()
    if not run["losses"]:
        return None
    tokens_per_step = args.global_batch_size * args.seq_length
    first = history.records[0]["iteration"] if history.records else 1
    saved = os.path.join(args.save, "iter_{:07d}".format(run["iterations"])) if args.save else None
    report, stabilizers = comm_report(), stabilizer_report()
    finished = bool(args.train_iters) and run["iterations"] >= args.train_iters
    summary = schema.make(
        route="gpu", recipe=args.nvfp4_recipe, finished=finished,
        stopped_by=None if finished else stopped_by, error=None, iterations=run["iterations"],
        train_iters=args.train_iters, resumed_from=first - 1 if first > 1 else None, losses=run["losses"],
        valid=run["valid"], median_step_s=run["median_step_s"],
        mean_step_s=run["mean_step_s"], train_time_s=None,
        tokens_per_step=tokens_per_step,
        tokens_per_s=tokens_per_step / run["median_step_s"] if run["median_step_s"] else None, parameters=None,
        peak_mem_gib=run["peak_mem_gib"], device=run["device"], world_size=int(os.environ.get("WORLD_SIZE", "1")),
        layout={"tp": args.tensor_model_parallel_size, "pp": args.pipeline_model_parallel_size,
                "vpp": getattr(args, "virtual_pipeline_model_parallel_size", None),
                "dp": getattr(args, "data_parallel_size", None), "sequence_parallel": bool(args.sequence_parallel),
                "distributed_optimizer": bool(args.use_distributed_optimizer)},
        model={"num_layers": args.num_layers, "hidden_size": args.hidden_size, "ffn_hidden_size": args.ffn_hidden_size,
               "num_attention_heads": args.num_attention_heads, "seq_length": args.seq_length,
               "micro_batch_size": args.micro_batch_size, "global_batch_size": args.global_batch_size},
        segments=run["segments"], checkpoint=saved if saved and os.path.isdir(saved) else None, plot=None,
        oscireset_events=stabilizers["oscireset_events"], outcontrol=stabilizers["outcontrol"],
        comm={k: report[k] for k in ("collectives", "plugin_gathers") if k in report})
    if plot:
        try:
            summary["plot"] = os.path.splitext(path)[0] + ".png"
            _plot({"losses": [l for _, l in summary["losses"]]}, summary["plot"],
                  f"GPT {args.num_layers}x{args.hidden_size}, {args.nvfp4_recipe}")
        except ImportError:                      # matplotlib is optional
            summary["plot"] = None
    write_json(path, summary)
    return summary


# --------------------------------------------------------------------------------------------------
# Run files of both routes: strict JSON, written atomically
# --------------------------------------------------------------------------------------------------

def json_safe(value):
    """`value` with every NaN / infinity as None (JSON has no such numbers: `null`), tuples as lists,
    NumPy and one-element torch numbers as Python numbers, recursively."""
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return json_safe(value.item())
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return json_safe(value.item())
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: str, obj) -> None:
    """Strict JSON (`allow_nan=False` after json_safe) written atomically: a reader, or a run killed
    while writing, sees the old file or the new one."""
    from .megatron.checkpoint import replace_text
    replace_text(path, json.dumps(json_safe(obj), indent=1, allow_nan=False) + "\n")


def prepare_gpu_save_folder(args) -> None:
    """The GPU route's --save folder: an earlier run's checkpoint there is resumed (--load SAVE),
    deleted (--overwrite, by global rank 0 before Megatron starts) or the run is refused (one line)."""
    if not getattr(args, "save", None):
        return
    from .megatron.checkpoint import check_save_folder, clear_save_folder, remove_leftovers
    check_save_folder(args.save, getattr(args, "load", None), args.nvfp4_overwrite)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if args.nvfp4_overwrite:
        removed = clear_save_folder(args.save)
        if removed:
            print(f"--overwrite: removed {', '.join(removed)} from {args.save}", flush=True)
    leftovers = remove_leftovers(args.save)      # partial saves of a killed run (patches/megatron_checkpoint.py)
    if leftovers:
        print(f"removed the unfinished save(s) {', '.join(leftovers)} of an earlier, killed run from {args.save}",
              flush=True)
