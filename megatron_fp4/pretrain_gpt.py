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
    a("--threads", type=int, default=None)
    add_plugin_args(p)
    return p


def _corpus(args):
    from .data import corpus
    if args.data_path:
        return args.data_path, args.valid_data_path or args.data_path
    out = os.path.join(args.save, "corpus")
    if not os.path.exists(os.path.join(out, "train.idx")):
        info = corpus.build(args.mfp4_corpus_src, out)
        print(f"built corpus from {info['source']}: {info['counts']}", flush=True)
    return os.path.join(out, "train"), os.path.join(out, "valid")


def _windows(tokens: np.ndarray, s, seed: int):
    from .megatron.driver import batch_from_tokens
    rng = np.random.default_rng(seed)
    n = s.seq_length + 1
    while True:
        starts = rng.integers(0, len(tokens) - n, size=s.micro_batch_size)
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


def cpu_main(argv) -> dict:
    args = cpu_parser().parse_args(argv)
    recipe = plugin_recipe(args)
    overrides = parse_overrides(args.mfp4_override)
    import torch.distributed as dist

    from .megatron import driver
    from .megatron.state import format_comm_stats
    from .testing import cpu_shim   # megatron-core on CPU needs the shim (the layers never import it)

    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.save, exist_ok=True)
    num_mb = 1
    if args.global_batch_size:
        if args.global_batch_size % args.micro_batch_size:
            raise ValueError("--global-batch-size must be a multiple of --micro-batch-size")
        num_mb = args.global_batch_size // args.micro_batch_size
    s = driver.GPTSettings(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads, seq_length=args.seq_length, vocab_size=256,
        micro_batch_size=args.micro_batch_size, num_microbatches=num_mb, recipe=args.mfp4_recipe,
        recipe_overrides=overrides, bf16_modules=tuple(p for p in args.mfp4_bf16_modules.split(",") if p),
        swiglu=args.swiglu, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        clip_grad=args.clip_grad, warmup_steps=args.lr_warmup_iters, train_steps=args.train_iters,
        seed=args.seed)
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{os.path.abspath(args.save)}/.pg_{os.getpid()}")
    cpu_shim.install()
    print(f"megatron_fp4 CPU driver: recipe {recipe.describe()}", flush=True)
    if args.mock_data:
        train_it = lambda: driver.synthetic_batches(s, 0, s.seed)  # noqa: E731
        valid_batches = [b for b, _ in zip(driver.synthetic_batches(s, 0, 99), range(args.eval_iters))]
    else:
        from .data.corpus import load_tokens
        train_prefix, valid_prefix = _corpus(args)
        train_tokens, valid_tokens = load_tokens(train_prefix), load_tokens(valid_prefix)
        print(f"data: {len(train_tokens)} train tokens, {len(valid_tokens)} held-out validation tokens",
              flush=True)
        train_it = lambda: _windows(train_tokens, s, s.seed)  # noqa: E731
        vit = _windows(valid_tokens, s, 4321)
        valid_batches = [next(vit) for _ in range(args.eval_iters)]

    driver.initialize_parallel(s)
    chunks, config = driver.build_model(s)
    optimizer, scheduler = driver.build_optimizer(s, chunks)
    driver.setup_model_hooks(config, chunks, optimizer)
    oscireset = driver.setup_stabilizers(s, chunks, optimizer)
    n_params = sum(p.numel() for m in chunks for p in m.parameters())
    print(f"model: {s.num_layers} layers, hidden {s.hidden_size}, ffn {s.ffn_hidden_size}, "
          f"{n_params / 1e6:.2f}M parameters; {s.micro_batch_size * num_mb * s.seq_length} tokens/step",
          flush=True)
    iterators = [train_it() for _ in chunks]
    history = {"losses": [], "step_times": [], "valid": []}
    tokens_per_step = s.micro_batch_size * num_mb * s.seq_length
    start = time.perf_counter()
    it = 0
    for it in range(s.train_steps):
        t0 = time.perf_counter()
        loss, grad_norm = driver.train_step(s, chunks, optimizer, scheduler, iterators, it)
        dt = time.perf_counter() - t0
        history["losses"].append(loss)
        history["step_times"].append(dt)
        if (it + 1) % args.log_interval == 0 or it == 0:
            print(f" iteration {it + 1:6d}/{s.train_steps:6d} | consumed tokens: {(it + 1) * tokens_per_step:9d} | "
                  f"elapsed time per iteration (ms): {dt * 1000:.1f} | tokens/s: {tokens_per_step / dt:.0f} | "
                  f"learning rate: {scheduler.get_lr(optimizer.param_groups[0]):.3E} | lm loss: {loss:.6E} | "
                  f"grad norm: {float(grad_norm):.3f}", flush=True)
        if (it + 1) % args.eval_interval == 0 or it == s.train_steps - 1:
            vloss = driver.evaluate(s, chunks, valid_batches)
            history["valid"].append((it + 1, vloss))
            print(f" validation loss at iteration {it + 1}: {vloss:.6E} | PPL: {math.exp(vloss):.3f}", flush=True)
        if time.perf_counter() - start > args.mfp4_time_budget:
            print(f"time budget of {args.mfp4_time_budget:.0f} s reached after {it + 1} iterations", flush=True)
            if not history["valid"] or history["valid"][-1][0] != it + 1:
                history["valid"].append((it + 1, driver.evaluate(s, chunks, valid_batches)))
            break
    train_time = time.perf_counter() - start
    from megatron.core import dist_checkpointing
    ckpt = os.path.join(os.path.abspath(args.save), f"iter_{it + 1:07d}")
    os.makedirs(ckpt, exist_ok=True)
    dist_checkpointing.save(chunks[0].module.sharded_state_dict(), ckpt)
    from .megatron.optimizer_hooks import save_oscireset_state
    save_oscireset_state(optimizer, ckpt)
    plot = os.path.join(args.save, "loss.png")
    _plot(history, plot, f"GPT {n_params / 1e6:.1f}M, {args.mfp4_recipe}, byte-level stdlib corpus")
    summary = {"recipe": args.mfp4_recipe, "iterations": it + 1, "train_time_s": round(train_time, 1),
               "first_loss": history["losses"][0], "last_loss": history["losses"][-1],
               "valid": history["valid"], "losses": history["losses"],
               "mean_step_s": float(np.mean(history["step_times"])),
               "tokens_per_s": tokens_per_step / float(np.mean(history["step_times"])),
               "checkpoint": ckpt, "plot": plot,
               "oscireset_events": [] if oscireset is None else oscireset.history,
               "outcontrol": {k: {kk: vv for kk, vv in v.items() if kk != "channels_selected"}
                              for k, v in driver.outcontrol_stats(chunks).items()}}
    with open(os.path.join(args.save, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    print(format_comm_stats(), flush=True)
    print(f"done: {summary}", flush=True)
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
