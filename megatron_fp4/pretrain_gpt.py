"""Pretrain a GPT with NVFP4 linears: `python -m megatron_fp4.pretrain_gpt [flags]`.

Route selection (`use_gpu_route`): with CUDA available (`torch.cuda.is_available()` and at least one
device) and no `--mfp4-cpu`, the GPU route runs; otherwise the CPU driver. The same command therefore
uses the GPU when there is one. Under torchrun every rank takes the same route.

GPU route: Megatron's own training loop (`megatron.training.pretrain`, NCCL) with all of Megatron's
flags plus the plugin's (`--mfp4-recipe NAME|PATH`, `--mfp4-override key=value`,
`--mfp4-bf16-modules`), `--transformer-impl local`, NVFP4TransformerConfig and the plugin spec
(megatron_fp4.spec.gpt_layer_spec); forward step and GPTDataset provider in pretrain_support.py.
Flags left out get the main job's defaults (small GPT, byte-level NullTokenizer with vocab 256, the
stdlib corpus built under `--save`, default `mfp4_run`); fusions whose apex/TE kernels are missing
are switched off. After the run a summary JSON (loss per iteration, median step time, peak memory)
and a loss plot go to `--mfp4-summary` (default `<save>/summary.json`).

CPU route (no GPU, or --mfp4-cpu): megatron.training cannot run on CPU, so a driver built from
megatron-core's GPTModel, DDP, optimizer and forward-backward schedule trains on gloo with the CPU
shim. The default run is the main job: a small GPT with quartet2 on the Python standard library's
sources (byte-level tokens; built into a Megatron indexed dataset on first use), printing progress
lines, saving a torch_dist checkpoint and a loss plot.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time

import numpy as np
import torch


def add_plugin_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("megatron_fp4")
    g.add_argument("--mfp4-recipe", default="quartet2",
                   help="NVFP4 recipe: built-in name (bf16, nvidia, tetrajet2, quartet2, ...) or YAML path")
    g.add_argument("--mfp4-override", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe knob (repeatable); VALUE is parsed as YAML")
    g.add_argument("--mfp4-bf16-modules", default="",
                   help="comma-separated fnmatch patterns of linears kept in BF16, e.g. "
                        "'decoder.layers.0.*,*.linear_fc2'")
    return parser


def parse_overrides(items) -> dict:
    import yaml
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--mfp4-override expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        if not key:
            raise ValueError(f"--mfp4-override: empty key in {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def plugin_recipe(args):
    """Validate the plugin flags early (unknown recipe, bad YAML, bad knob) with a clear error."""
    from .registry import load_recipe
    return load_recipe(args.mfp4_recipe, parse_overrides(args.mfp4_override) or None)


# --------------------------------------------------------------------------------------------------
# GPU: megatron.training.pretrain
# --------------------------------------------------------------------------------------------------

def _gpu_main(argv):
    from megatron.core.enums import ModelType
    from megatron.training import pretrain

    from .patches import megatron_args, megatron_training
    from .pretrain_support import (TrainingHistory, build_config, forward_step, single_process_env,
                                   train_valid_test_datasets_provider, write_summary)

    single_process_env()

    megatron_args.apply()
    megatron_training.apply()        # stabilizers after setup_model_and_optimizer; dataset helpers
    args, cfg = build_config(argv)
    if args.mfp4_count_collectives:
        from .megatron.diagnostics import install_collective_counter
        install_collective_counter()
    summary_path = args.mfp4_summary or (os.path.join(args.save, "summary.json") if args.save else None)
    history = TrainingHistory(summary_path, every=args.log_interval).install()
    pretrain(cfg, train_valid_test_datasets_provider, ModelType.encoder_or_decoder, forward_step)
    summary = write_summary(history, args, summary_path)
    if summary is not None:
        print(f"mfp4 summary: {json.dumps({k: v for k, v in summary.items() if k != 'losses'})}", flush=True)
    return summary


# --------------------------------------------------------------------------------------------------
# CPU: megatron-core driver
# --------------------------------------------------------------------------------------------------

def add_diagnostic_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Measurement flags of the launcher (both routes; megatron_fp4/megatron/diagnostics.py)."""
    g = parser.add_argument_group("megatron_fp4 diagnostics")
    g.add_argument("--mfp4-count-collectives", action="store_true",
                   help="count the bytes of every torch.distributed collective per iteration and process-group "
                        "role (tp/dp/pp) into the run summary")
    g.add_argument("--mfp4-dump-grads", default=None, metavar="PATH",
                   help="write the first optimizer step's reduced gradients, gathered to the TP=1 layout, "
                        "and the plugin layers' random-stream keys to PATH (torch.save; pipeline-parallel size 1)")
    g.add_argument("--mfp4-perturb-init", type=float, default=0.0, metavar="EPS",
                   help="scale every initial weight matrix by (1 + EPS): a last-bit perturbation, to measure how "
                        "far FP4 rounding amplifies reduction-order differences (FP32 parameters only)")
    return parser


def cpu_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_fp4.pretrain_gpt",
                                description="NVFP4 GPT pretraining (CPU driver; Megatron flag names)")
    a = p.add_argument
    a("--num-layers", type=int, default=4)
    a("--hidden-size", type=int, default=256)
    a("--ffn-hidden-size", type=int, default=768)
    a("--num-attention-heads", type=int, default=4)
    a("--seq-length", type=int, default=128)
    a("--micro-batch-size", type=int, default=8)
    a("--global-batch-size", type=int, default=None)
    a("--train-iters", type=int, default=300)
    a("--lr", type=float, default=2e-3)
    a("--min-lr", type=float, default=2e-4)
    a("--lr-warmup-iters", type=int, default=20)
    a("--weight-decay", type=float, default=0.01)
    a("--clip-grad", type=float, default=1.0)
    a("--seed", type=int, default=1234)
    a("--swiglu", action="store_true")
    a("--data-path", default=None, help="indexed-dataset prefix (train); default: build the corpus")
    a("--valid-data-path", default=None)
    a("--mock-data", action="store_true", help="synthetic learnable sequences instead of a corpus")
    a("--mfp4-corpus-src", default=None, help="directory of text files (default: Python stdlib)")
    a("--save", default="mfp4_run", help="output directory: checkpoint, loss plot, log")
    a("--log-interval", type=int, default=10)
    a("--eval-interval", type=int, default=100)
    a("--eval-iters", type=int, default=4)
    a("--mfp4-time-budget", type=float, default=540.0,
      help="stop training after this many seconds (the main job must finish in 10 minutes)")
    a("--mfp4-cpu", action="store_true", help="use the CPU driver even when a GPU is present")
    a("--mfp4-summary", default=None, help="run summary JSON (default <save>/summary.json)")
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
    meg.add_argument("--position-embedding-type", choices=["rope"], default="rope")
    meg.add_argument("--normalization", choices=["RMSNorm", "LayerNorm"], default="RMSNorm")
    meg.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                     help="accepted: the CPU driver always unties them")
    meg.add_argument("--disable-bias-linear", action="store_true", help="accepted: the CPU driver has no biases")
    meg.add_argument("--transformer-impl", choices=["local"], default="local")
    meg.add_argument("--bf16", action="store_true", help="BF16 parameters and activations (FP32 otherwise)")
    meg.add_argument("--mfp4-fp32", action="store_true", help="FP32 parameters and activations (the default here)")
    meg.add_argument("--tokenizer-type", choices=["NullTokenizer"], default="NullTokenizer")
    meg.add_argument("--vocab-size", type=int, default=256, help="vocabulary (>= 256; byte-level data)")
    meg.add_argument("--lr-decay-style", choices=["cosine"], default="cosine")
    meg.add_argument("--use-cpu-initialization", action="store_true",
                     help="accepted: the CPU driver always draws full weights on the CPU")
    meg.add_argument("--first-last-layers-bf16", action="store_true")
    meg.add_argument("--num-layers-at-start-in-bf16", type=int, default=1)
    meg.add_argument("--num-layers-at-end-in-bf16", type=int, default=1)
    add_plugin_args(p)
    add_diagnostic_args(p)
    return p


def parallel_layout(args, world_size: int) -> dict:
    """TP/PP/VPP/DP sizes and micro-batches per step from Megatron's flags and the world size."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        raise ValueError(f"parallel sizes must be >= 1, got TP={tp}, PP={pp}")
    if world_size % (tp * pp):
        raise ValueError(f"world size {world_size} is not divisible by TP x PP = {tp} x {pp}")
    dp = world_size // (tp * pp)
    vpp = args.num_virtual_stages_per_pipeline_rank
    if args.num_layers_per_virtual_pipeline_stage is not None:
        per = args.num_layers_per_virtual_pipeline_stage
        if per < 1 or args.num_layers % (pp * per):
            raise ValueError(f"--num-layers {args.num_layers} is not divisible by PP x "
                             f"--num-layers-per-virtual-pipeline-stage = {pp} x {per}")
        vpp = args.num_layers // (pp * per)
    if vpp is not None and vpp > 1 and pp < 2:
        raise ValueError("virtual pipeline stages need --pipeline-model-parallel-size >= 2")
    vpp = vpp if vpp and vpp > 1 else None
    if args.num_layers % (pp * (vpp or 1)):
        raise ValueError(f"--num-layers {args.num_layers} is not divisible by the {pp * (vpp or 1)} pipeline stages")
    if args.sequence_parallel and tp == 1:
        raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    per_step = args.micro_batch_size * dp
    gbs = args.global_batch_size or per_step
    if gbs % per_step:
        raise ValueError(f"--global-batch-size {gbs} is not divisible by micro-batch size x data-parallel "
                         f"size = {args.micro_batch_size} x {dp}")
    return {"tp": tp, "pp": pp, "vpp": vpp, "dp": dp, "num_microbatches": gbs // per_step,
            "global_batch_size": gbs}


def _corpus(args):
    from .data import corpus
    if args.data_path:
        return args.data_path, args.valid_data_path or args.data_path
    return corpus.ensure(os.path.join(args.save, "corpus"), args.mfp4_corpus_src)


def _windows(tokens: np.ndarray, s, seed: int, dp_rank: int = 0, dp_size: int = 1):
    """Micro-batches of random windows from one stream; with data parallelism replica r takes the
    stream's micro-batches r, r + dp, r + 2 dp, ... so that a global batch holds the same samples at
    every DP size (as Megatron's sampler does)."""
    from .megatron.driver import batch_from_tokens
    rng = np.random.default_rng(seed)
    n = s.seq_length + 1
    for index in itertools.count():
        starts = rng.integers(0, len(tokens) - n, size=s.micro_batch_size)
        if index % dp_size == dp_rank:
            yield batch_from_tokens(torch.from_numpy(np.stack([tokens[i:i + n] for i in starts]).astype(np.int64)))


def _plot(history, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(history["losses"]) + 1), history["losses"], label="train loss", lw=1)
    if history.get("valid"):
        xs, ys = zip(*history["valid"])
        ax.plot(xs, ys, "o-", label="validation loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats/byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _init_cpu_process_group(save: str):
    """gloo: torchrun's env:// rendezvous when launched by it, else a one-process group."""
    import torch.distributed as dist
    from datetime import timedelta
    if dist.is_initialized():
        return
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        dist.init_process_group("gloo", init_method="env://", timeout=timedelta(minutes=10))
    else:
        dist.init_process_group("gloo", rank=0, world_size=1,
                                init_method=f"file://{os.path.abspath(save)}/.pg_{os.getpid()}")


def _all_ranks_agree(flag: bool) -> bool:
    """True on every rank when it is true on any (a time-budget stop must be collective)."""
    import torch.distributed as dist
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _dp_mean(value: float) -> float:
    """A last-stage loss (already broadcast over the pipeline) averaged over data-parallel replicas."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    if ps.get_data_parallel_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, group=ps.get_data_parallel_group())
    return t.item() / ps.get_data_parallel_world_size()


def _checkpoint_state(chunks) -> dict:
    if len(chunks) == 1:
        return chunks[0].module.sharded_state_dict()
    return {f"model{i}": c.module.sharded_state_dict() for i, c in enumerate(chunks)}   # Megatron's VPP layout


def cpu_main(argv) -> dict:
    args = cpu_parser().parse_args(argv)
    recipe = plugin_recipe(args)
    overrides = parse_overrides(args.mfp4_override)
    import torch.distributed as dist

    from .megatron import diagnostics, driver
    from .megatron.state import format_comm_stats
    from .testing import cpu_shim   # megatron-core on CPU needs the shim (the layers never import it)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_position_embeddings is not None and args.max_position_embeddings < args.seq_length:
        raise ValueError(f"--max-position-embeddings {args.max_position_embeddings} < --seq-length {args.seq_length}")
    if args.bf16 and args.mfp4_fp32:
        raise ValueError("--bf16 and --mfp4-fp32 contradict each other")
    if args.vocab_size < 256:
        raise ValueError(f"--vocab-size {args.vocab_size}: the byte-level data needs at least 256")
    os.makedirs(args.save, exist_ok=True)
    _init_cpu_process_group(args.save)
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
        recipe=args.mfp4_recipe,
        recipe_overrides=overrides, bf16_modules=tuple(p for p in args.mfp4_bf16_modules.split(",") if p),
        first_last_layers_bf16=args.first_last_layers_bf16,
        num_layers_at_start_in_bf16=args.num_layers_at_start_in_bf16,
        num_layers_at_end_in_bf16=args.num_layers_at_end_in_bf16, bf16=args.bf16, normalization=args.normalization,
        swiglu=args.swiglu, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        clip_grad=args.clip_grad, warmup_steps=args.lr_warmup_iters, train_steps=args.train_iters,
        seed=args.seed)
    cpu_shim.install()
    if args.mfp4_count_collectives:
        diagnostics.install_collective_counter()
    say(f"megatron_fp4 CPU driver: recipe {recipe.describe()}")
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
        train_it = lambda: driver.synthetic_batches(s, dp_rank, s.seed)  # noqa: E731
        valid_batches = [b for b, _ in zip(driver.synthetic_batches(s, 0, 99), range(args.eval_iters))]
    else:
        from .data.corpus import load_tokens
        if rank == 0:
            _corpus(args)                                 # builds on first use: one writer
        dist.barrier()
        train_prefix, valid_prefix = _corpus(args)
        train_tokens, valid_tokens = load_tokens(train_prefix), load_tokens(valid_prefix)
        say(f"data: {len(train_tokens)} train tokens, {len(valid_tokens)} held-out validation tokens")
        train_it = lambda: _windows(train_tokens, s, s.seed, dp_rank, layout["dp"])  # noqa: E731
        vit = _windows(valid_tokens, s, 4321)
        valid_batches = [next(vit) for _ in range(args.eval_iters)]

    chunks, config = driver.build_model(s)
    optimizer, scheduler = driver.build_optimizer(s, chunks)
    driver.setup_model_hooks(config, chunks, optimizer)
    oscireset = driver.setup_stabilizers(s, chunks, optimizer)
    if args.mfp4_perturb_init:
        diagnostics.perturb_initial_weights(chunks, optimizer, args.mfp4_perturb_init)
    if args.mfp4_dump_grads:
        diagnostics.install_first_step_grad_dump(optimizer, chunks, args.mfp4_dump_grads, s.swiglu)
    n_local = sum(p.numel() for m in chunks for p in m.parameters())
    counts = torch.tensor([float(n_local)])
    if ps.get_tensor_model_parallel_world_size() * ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(counts, group=ps.get_model_parallel_group())
    n_params = int(counts.item())
    tokens_per_step = s.micro_batch_size * s.num_microbatches * layout["dp"] * s.seq_length
    say(f"model: {s.num_layers} layers, hidden {s.hidden_size}, ffn {s.ffn_hidden_size}, "
        f"{n_params / 1e6:.2f}M parameters; {tokens_per_step} tokens/step")
    iterators = [train_it() for _ in chunks]
    history = {"losses": [], "step_times": [], "valid": []}
    start = time.perf_counter()
    it = 0
    for it in range(s.train_steps):
        t0 = time.perf_counter()
        loss, grad_norm = driver.train_step(s, chunks, optimizer, scheduler, iterators, it)
        loss = _dp_mean(driver.broadcast_from_last_stage(loss))
        dt = time.perf_counter() - t0
        history["losses"].append(loss)
        history["step_times"].append(dt)
        if (it + 1) % args.log_interval == 0 or it == 0:
            say(f" iteration {it + 1:6d}/{s.train_steps:6d} | consumed tokens: {(it + 1) * tokens_per_step:9d} | "
                f"elapsed time per iteration (ms): {dt * 1000:.1f} | tokens/s: {tokens_per_step / dt:.0f} | "
                f"learning rate: {scheduler.get_lr(optimizer.param_groups[0]):.3E} | lm loss: {loss:.6E} | "
                f"grad norm: {float(grad_norm):.3f}")
        if args.eval_iters > 0 and ((it + 1) % args.eval_interval == 0 or it == s.train_steps - 1):
            vloss = driver.broadcast_from_last_stage(driver.evaluate(s, chunks, valid_batches))
            history["valid"].append((it + 1, vloss))
            say(f" validation loss at iteration {it + 1}: {vloss:.6E} | PPL: {math.exp(vloss):.3f}")
        if _all_ranks_agree(time.perf_counter() - start > args.mfp4_time_budget):
            say(f"time budget of {args.mfp4_time_budget:.0f} s reached after {it + 1} iterations")
            if args.eval_iters > 0 and (not history["valid"] or history["valid"][-1][0] != it + 1):
                vloss = driver.broadcast_from_last_stage(driver.evaluate(s, chunks, valid_batches))
                history["valid"].append((it + 1, vloss))
            break
    train_time = time.perf_counter() - start
    from megatron.core import dist_checkpointing
    ckpt = os.path.join(os.path.abspath(args.save), f"iter_{it + 1:07d}")
    os.makedirs(ckpt, exist_ok=True)
    dist_checkpointing.save(_checkpoint_state(chunks), ckpt)
    from .megatron.optimizer_hooks import save_oscireset_state
    save_oscireset_state(optimizer, ckpt)
    plot = os.path.join(args.save, "loss.png")
    steady = history["step_times"][1:] or history["step_times"]
    summary = {"recipe": args.mfp4_recipe, "iterations": it + 1, "train_time_s": round(train_time, 1),
               "first_loss": history["losses"][0], "last_loss": history["losses"][-1],
               "valid": history["valid"], "losses": history["losses"],
               "mean_step_s": float(np.mean(history["step_times"])),
               "median_step_s": float(np.median(steady)),
               "tokens_per_step": tokens_per_step,
               "tokens_per_s": tokens_per_step / float(np.mean(history["step_times"])),
               "parameters": n_params, "device": "cpu", "world_size": world,
               "layout": {**layout, "sequence_parallel": s.sequence_parallel,
                          "distributed_optimizer": s.use_distributed_optimizer},
               "checkpoint": ckpt, "plot": plot,
               "oscireset_events": [] if oscireset is None else oscireset.history,
               "outcontrol": {k: {kk: vv for kk, vv in v.items() if kk != "channels_selected"}
                              for k, v in driver.outcontrol_stats(chunks).items()},
               **diagnostics.comm_report()}
    if main_rank:
        _plot(history, plot, f"GPT {n_params / 1e6:.1f}M, {args.mfp4_recipe}, "
                             + ("mock data" if args.mock_data else "byte-level corpus"))
        with open(args.mfp4_summary or os.path.join(args.save, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=1)
        print(format_comm_stats(), flush=True)
        brief = {k: v for k, v in summary.items() if k not in ("losses", "oscireset_events", "outcontrol")}
        print(f"done: {brief}", flush=True)
    return summary


def use_gpu_route(argv) -> bool:
    """The GPU route needs CUDA and no --mfp4-cpu; everything else goes to the CPU driver."""
    return torch.cuda.is_available() and torch.cuda.device_count() > 0 and "--mfp4-cpu" not in argv


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if use_gpu_route(argv):
        return _gpu_main(argv)
    return cpu_main(argv)


def cli() -> int:
    """Console script `megatron-fp4-pretrain` (same as `python -m megatron_fp4.pretrain_gpt`)."""
    main()
    return 0


if __name__ == "__main__":
    main()
