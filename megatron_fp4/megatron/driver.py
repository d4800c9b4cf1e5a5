"""A small megatron-core training driver: GPTModel (plugin spec) + DDP + Megatron optimizer +
`get_forward_backward_func`. It is what the launcher runs where `megatron.training.pretrain` cannot
(CPU, where megatron.training is full of CUDA calls), and what the multi-process tests drive.

Expects torch.distributed to be initialized (gloo on CPU, with megatron_fp4.patches.torch_cpu
installed by the caller) and builds everything else.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterator, Optional

import torch

from ..defaults import MAIN_JOB


@dataclass
class GPTSettings:
    """The driver's run: Megatron-named model and training settings (defaults: the main job, defaults.py)."""
    num_layers: int = MAIN_JOB["num_layers"]
    hidden_size: int = MAIN_JOB["hidden_size"]
    ffn_hidden_size: int = MAIN_JOB["ffn_hidden_size"]
    num_attention_heads: int = MAIN_JOB["num_attention_heads"]
    seq_length: int = MAIN_JOB["seq_length"]
    vocab_size: int = MAIN_JOB["vocab_size"]
    micro_batch_size: int = MAIN_JOB["micro_batch_size"]
    num_microbatches: int = 1
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False     # reduce each gradient bucket as soon as it is complete
    recipe: str = "quartet2"
    attention: str = "sdpa"              # core attention: sdpa | megatron (--nvfp4-attention)
    recipe_overrides: dict = field(default_factory=dict)
    bf16_modules: tuple = ()
    first_last_layers_bf16: bool = False
    num_layers_at_start_in_bf16: int = 1
    num_layers_at_end_in_bf16: int = 1
    bf16: bool = False                   # BF16 params/activations (Float16Module); FP32 otherwise
    swiglu: bool = False
    normalization: str = MAIN_JOB["normalization"]
    lr: float = MAIN_JOB["lr"]
    min_lr: float = MAIN_JOB["min_lr"]
    weight_decay: float = MAIN_JOB["weight_decay"]
    clip_grad: float = MAIN_JOB["clip_grad"]
    warmup_steps: int = MAIN_JOB["lr_warmup_iters"]
    train_steps: int = MAIN_JOB["train_iters"]
    seed: int = MAIN_JOB["seed"]
    batch_p2p_comm: bool = False          # gloo mis-orders batched p2p with VPP (cpu-testing.md)
    recompute: bool = False               # full activation recomputation


def transformer_config(s: GPTSettings):
    from .config import NVFP4TransformerConfig
    dtype = torch.bfloat16 if s.bf16 else torch.float32
    return NVFP4TransformerConfig(
        num_layers=s.num_layers, hidden_size=s.hidden_size, ffn_hidden_size=s.ffn_hidden_size,
        num_attention_heads=s.num_attention_heads, use_cpu_initialization=True,
        params_dtype=dtype, bf16=s.bf16, pipeline_dtype=dtype, autocast_dtype=dtype,
        tensor_model_parallel_size=s.tp, pipeline_model_parallel_size=s.pp,
        virtual_pipeline_model_parallel_size=s.vpp, sequence_parallel=s.sequence_parallel and s.tp > 1,
        normalization=s.normalization, gated_linear_unit=s.swiglu,
        activation_func=torch.nn.functional.silu if s.swiglu else torch.nn.functional.gelu,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        batch_p2p_comm=s.batch_p2p_comm, first_last_layers_bf16=s.first_last_layers_bf16,
        num_layers_at_start_in_bf16=s.num_layers_at_start_in_bf16,
        num_layers_at_end_in_bf16=s.num_layers_at_end_in_bf16,
        recompute_granularity="full" if s.recompute else None,
        recompute_method="uniform" if s.recompute else None,
        recompute_num_layers=1 if s.recompute else None,
        init_method_std=0.02, nvfp4_recipe=s.recipe, nvfp4_overrides=dict(s.recipe_overrides),
        nvfp4_bf16_modules=tuple(s.bf16_modules), nvfp4_attention=s.attention)


def initialize_parallel(s: GPTSettings):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    ps.initialize_model_parallel(tensor_model_parallel_size=s.tp, pipeline_model_parallel_size=s.pp,
                                 virtual_pipeline_model_parallel_size=s.vpp)
    model_parallel_cuda_manual_seed(s.seed)


def build_model(s: GPTSettings, config=None, wrap_ddp: bool = True):
    """Model chunks (one per virtual stage), each GPTModel with the plugin spec, DDP-wrapped."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.module import Float16Module

    from ..spec import gpt_layer_spec
    config = config or transformer_config(s)
    torch.manual_seed(s.seed)  # use_cpu_initialization draws full masters from the CPU generator
    chunks = []
    vpp = s.vpp or 1
    for stage in range(vpp):
        vp_stage = stage if s.vpp else None
        pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        model = GPTModel(config=config, transformer_layer_spec=gpt_layer_spec(config, vp_stage=vp_stage),
                         vocab_size=s.vocab_size, max_sequence_length=s.seq_length, pre_process=pre,
                         post_process=post, position_embedding_type="rope",
                         share_embeddings_and_output_weights=False, vp_stage=vp_stage)
        if s.bf16:
            model = Float16Module(config, model)
        chunks.append(model)
    if not wrap_ddp:
        return chunks, config
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=s.overlap_grad_reduce,
                                               use_distributed_optimizer=s.use_distributed_optimizer)
    chunks = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=m,
                                      disable_bucketing=(i > 0)) for i, m in enumerate(chunks)]
    for m in chunks:
        m.broadcast_params()
    return chunks, config


def build_optimizer(s: GPTSettings, chunks):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    opt_config = OptimizerConfig(optimizer="adam", lr=s.lr, min_lr=s.min_lr, weight_decay=s.weight_decay,
                                 adam_beta1=0.9, adam_beta2=0.95, clip_grad=s.clip_grad, bf16=s.bf16,
                                 params_dtype=torch.bfloat16 if s.bf16 else torch.float32,
                                 use_distributed_optimizer=s.use_distributed_optimizer)
    optimizer = get_megatron_optimizer(opt_config, chunks)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=s.lr, min_lr=s.min_lr, lr_warmup_steps=s.warmup_steps,
        lr_decay_steps=max(s.train_steps, s.warmup_steps + 1), lr_decay_style="cosine",
        start_wd=s.weight_decay, end_wd=s.weight_decay, wd_incr_steps=s.train_steps,
        wd_incr_style="constant")
    return optimizer, scheduler


def _loss_func(loss_mask, output_tensor):
    losses = output_tensor.float()
    loss = torch.sum(losses.view(-1) * loss_mask.view(-1)) / loss_mask.sum()
    # clone: the schedule divides the returned loss in place by num_microbatches
    return loss, {"lm loss": loss.detach().clone()}


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"])


def batch_from_tokens(tokens: torch.Tensor) -> dict:
    """[b, s+1] token ids -> a GPT batch (inputs, shifted labels, mask, positions)."""
    tokens = tokens.long()
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    b, s = inputs.shape
    return {"tokens": inputs, "labels": labels, "loss_mask": torch.ones(b, s),
            "position_ids": torch.arange(s).unsqueeze(0).expand(b, s).contiguous()}


def synthetic_batches(s: GPTSettings, dp_rank: int, seed: int = 0, skip: int = 0) -> Iterator[dict]:
    """A learnable stream: affine recurrences mod vocab with random starts (loss drops fast).
    `skip`: micro-batches already consumed (a resumed run continues the stream where it stopped)."""
    g = torch.Generator().manual_seed(seed * 1000 + dp_rank)
    for _ in range(skip):
        torch.randint(0, s.vocab_size, (s.micro_batch_size, 1), generator=g)
        torch.randint(1, 4, (s.micro_batch_size, 1), generator=g)
    while True:
        start = torch.randint(0, s.vocab_size, (s.micro_batch_size, 1), generator=g)
        mult = torch.randint(1, 4, (s.micro_batch_size, 1), generator=g)
        steps = torch.arange(s.seq_length + 1).unsqueeze(0)
        yield batch_from_tokens((start + mult * steps) % s.vocab_size)


def setup_model_hooks(config, chunks, optimizer):
    from megatron.core.distributed import finalize_model_grads
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    no_sync = [m.no_sync for m in chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync


def train_step(s: GPTSettings, chunks, optimizer, scheduler, data_iterators, iteration: int):
    """One optimizer step over num_microbatches; returns (mean loss or None off the last stage, grad_norm)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from .state import set_iteration
    set_iteration(iteration)
    for m in chunks:
        m.zero_grad_buffer()
    optimizer.zero_grad()
    fwd_bwd = get_forward_backward_func()
    losses = fwd_bwd(forward_step_func=forward_step,
                     data_iterator=data_iterators if len(chunks) > 1 else data_iterators[0],
                     model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=s.num_microbatches,
                     seq_length=s.seq_length, micro_batch_size=s.micro_batch_size, forward_only=False)
    ok, grad_norm, _ = optimizer.step()
    if ok:
        scheduler.step(increment=1)
    loss = None
    if ps.is_pipeline_last_stage(ignore_virtual=True) and losses:
        loss = torch.stack([x["lm loss"] for x in losses]).mean().item()
    return loss, grad_norm


@torch.no_grad()
def evaluate(s: GPTSettings, chunks, batches: list) -> Optional[float]:
    """Mean loss over fixed batches (each is one micro-batch), forward only."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    for m in chunks:
        m.eval()
    iters = [iter(batches) for _ in chunks]
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iters if len(chunks) > 1 else iters[0],
        model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=len(batches),
        seq_length=s.seq_length, micro_batch_size=s.micro_batch_size, forward_only=True)
    for m in chunks:
        m.train()
    if ps.is_pipeline_last_stage(ignore_virtual=True) and losses:
        return torch.stack([x["lm loss"] for x in losses]).mean().item()
    return None


def broadcast_from_last_stage(value: Optional[float]) -> float:
    """Make a last-stage scalar (loss) known on every rank (for logging and tests)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    t = torch.tensor([math.nan if value is None else value], dtype=torch.float64)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        src = ps.get_pipeline_model_parallel_last_rank()
        dist.broadcast(t, src=src, group=ps.get_pipeline_model_parallel_group())
    return t.item()


def run_training(s: GPTSettings, data_iterator_factory: Optional[Callable] = None,
                 log: Optional[Callable[[str], None]] = None, log_interval: int = 1) -> dict:
    """Build and train; returns {"losses": [...], "grad_norms": [...], "step_times": [...], ...}."""
    from megatron.core import parallel_state as ps
    initialize_parallel(s)
    chunks, config = build_model(s)
    optimizer, scheduler = build_optimizer(s, chunks)
    setup_model_hooks(config, chunks, optimizer)
    oscireset = setup_stabilizers(s, chunks, optimizer)
    dp_rank = ps.get_data_parallel_rank()
    if data_iterator_factory is None:
        data_iterator_factory = lambda: synthetic_batches(s, dp_rank, s.seed)  # noqa: E731
    iterators = [data_iterator_factory() for _ in chunks]
    history = {"losses": [], "grad_norms": [], "step_times": []}
    tokens_per_step = s.micro_batch_size * s.num_microbatches * s.seq_length * ps.get_data_parallel_world_size()
    for it in range(s.train_steps):
        t0 = time.perf_counter()
        loss, grad_norm = train_step(s, chunks, optimizer, scheduler, iterators, it)
        dt = time.perf_counter() - t0
        loss = broadcast_from_last_stage(loss)
        history["losses"].append(loss)
        history["grad_norms"].append(float(grad_norm) if grad_norm is not None else math.nan)
        history["step_times"].append(dt)
        if log and (it % log_interval == 0 or it == s.train_steps - 1):
            log(f" iteration {it + 1:6d}/{s.train_steps:6d} | lm loss: {loss:.6E} | grad norm: "
                f"{history['grad_norms'][-1]:.3f} | lr: {scheduler.get_lr(optimizer.param_groups[0]):.3E} | "
                f"elapsed time per iteration (ms): {dt * 1000:.1f} | tokens/s: {tokens_per_step / dt:.0f}")
    history["chunks"], history["optimizer"], history["config"] = chunks, optimizer, config
    history["oscireset"] = [] if oscireset is None else oscireset.history
    history["outcontrol"] = outcontrol_stats(chunks)
    return history


def setup_stabilizers(s: GPTSettings, chunks, optimizer, iteration: int = 0):
    """Declare the run length (stabilizer schedules may be fractions of it) and install OsciReset
    when the recipe asks for it; returns the OsciResetHooks or None."""
    from .optimizer_hooks import install_stabilizers
    from .state import set_train_iters
    set_train_iters(s.train_steps)
    return install_stabilizers(optimizer, chunks, s.train_steps, iteration=iteration)


def outcontrol_stats(chunks) -> dict:
    """Per-layer OutControl selections made so far (outlier count, share of the recorded input norm)."""
    return {getattr(m, "nvfp4_name", n): m.nvfp4_outcontrol_stats for c in chunks for n, m in c.named_modules()
            if getattr(m, "nvfp4_outcontrol_stats", None) is not None}
