"""Core attention on torch's scaled_dot_product_attention, for the plugin spec (`--nvfp4-attention`).

Megatron's local spec computes core attention with `DotProductAttention`, which materialises the
[b, np, sq, sk] scores and probabilities. `SDPAttention` has the same constructor and forward
(query/key/value [s, b, heads, head_dim] -> context [sq, b, heads * head_dim], the heads of this
tensor-parallel rank only) and the same semantics, computed by
`torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels on CUDA):

- masks: with `attention_mask` None and mask type `causal` (the forward's `attn_mask_type` when
  given, else the constructor's), causal attention (`is_causal`, the flash kernel); a one-token
  query (KV-cache decoding) attends to everything, as in Megatron. An explicit boolean mask
  (True = masked out, broadcastable to [b, np, sq, sk]) is used as given, for any mask type, as
  Megatron's DotProductAttention does (it replaces the causal mask; the dataloader's mask already
  holds causality). Megatron fills masked scores with -10000, so a query row whose keys are all
  masked gets the plain mean of the values: reproduced here (torch would give 0 or NaN), without
  dropout on such rows. A mask rules out the flash kernel (the memory-efficient one takes it), so the
  launcher drops the dataloader's redundant causal mask (`--no-create-attention-mask-in-dataloader`
  unless --reset-attention-mask or --nvfp4-attention megatron).
- scale: `softmax_scale` (config.softmax_scale) or 1/sqrt(head_dim). apply_query_key_layer_scaling
  divides the scores by the layer number before the FP32 softmax and multiplies them back inside
  it, so the softmax sees the same scale; SDPA applies it once.
- GQA (num_query_groups < heads): query head h uses key/value group h // (np / ng), as Megatron's
  repeat_interleave; the group count is read from the tensors (Megatron passes one replicated group
  per rank when num_query_groups < TP).
- dropout: config.attention_dropout (or the constructor's), in training mode only, drawn inside the
  tensor-parallel RNG tracker's fork unless sequence parallelism is on (as Megatron does).
- softmax precision: the flash and memory-efficient kernels keep the scores and the softmax in FP32
  for BF16/FP16 inputs (Megatron's attention_softmax_in_fp32 behaviour, whatever that flag says).

What it does not support is handled at build by `build_core_attention` (the spec's core_attention
slot): sliding-window attention and softmax types other than `vanilla` fall back to Megatron's own
DotProductAttention with a one-time log line (it implements them); context parallelism > 1 is
refused (neither implements it: it needs Transformer Engine). At forward, packed sequences
(packed_seq_params, THD) and attention_bias are refused with an error, as Megatron's local
attention refuses them.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide

from .config import UnsupportedConfigError, _megatron_args

log = logging.getLogger(__name__)

ATTENTION_CHOICES = ("sdpa", "megatron")
DEFAULT_ATTENTION = "sdpa"

_logged: set = set()


def attention_choice(config) -> str:
    """The run's core attention: config.nvfp4_attention, else (a plain TransformerConfig from a stock
    Megatron entry point with install()) the --nvfp4-attention flag, else `sdpa`."""
    choice = getattr(config, "nvfp4_attention", None)
    if choice is None:
        args = _megatron_args()
        choice = getattr(args, "nvfp4_attention", None) if args is not None else None
    choice = DEFAULT_ATTENTION if choice is None else choice
    if choice not in ATTENTION_CHOICES:
        raise UnsupportedConfigError(
            f"nvfp4_attention {choice!r} (--nvfp4-attention): choose one of {', '.join(ATTENTION_CHOICES)} "
            "(sdpa: torch scaled_dot_product_attention; megatron: Megatron's unfused DotProductAttention)")
    return choice


def fallback_reason(config, layer_number: int) -> Optional[str]:
    """Why this layer's core attention must be Megatron's DotProductAttention, or None."""
    if getattr(config, "softmax_type", "vanilla") != "vanilla":
        return f"--softmax-type {config.softmax_type}"
    if is_layer_window_attention(getattr(config, "window_size", None),
                                 getattr(config, "window_attn_skip_freq", None), layer_number):
        return f"sliding-window attention (--window-size {tuple(config.window_size)})"
    return None


def build_core_attention(config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                         attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                         cp_comm_type: Optional[str] = None,
                         pg_collection: Optional[ProcessGroupCollection] = None) -> MegatronModule:
    """The plugin spec's core_attention builder: SDPAttention, or Megatron's DotProductAttention for
    what SDPAttention does not implement (logged once per reason)."""
    kwargs = dict(config=config, layer_number=layer_number, attn_mask_type=attn_mask_type,
                  attention_type=attention_type, attention_dropout=attention_dropout,
                  softmax_scale=softmax_scale, cp_comm_type=cp_comm_type, pg_collection=pg_collection)
    reason = fallback_reason(config, layer_number)
    if reason is not None:
        if reason not in _logged:
            _logged.add(reason)
            log.warning("megatron_fp4: %s is not implemented by the sdpa core attention; layers that use it "
                        "run Megatron's unfused DotProductAttention (--nvfp4-attention megatron silences this)",
                        reason)
        return DotProductAttention(**kwargs)
    return SDPAttention(**kwargs)


class SDPAttention(MegatronModule):
    """Megatron DotProductAttention's interface on torch.nn.functional.scaled_dot_product_attention
    (semantics in this module's docstring). No parameters, no state-dict entries (as
    DotProductAttention with the vanilla softmax), so checkpoints are interchangeable."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__(config=config)
        if getattr(config, "context_parallel_size", 1) != 1:
            raise UnsupportedConfigError(
                f"--context-parallel-size {config.context_parallel_size}: context parallelism needs Transformer "
                "Engine's attention, which the plugin spec does not use (neither the sdpa nor Megatron's local "
                "core attention splits the sequence); use --context-parallel-size 1")
        reason = fallback_reason(config, layer_number)
        if reason is not None:
            raise UnsupportedConfigError(
                f"SDPAttention: {reason} is not implemented; build core attention with "
                "megatron_fp4.megatron.attention.build_core_attention (falls back to DotProductAttention) "
                "or pass --nvfp4-attention megatron")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        world = pg_collection.tp.size()
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, world)
        self.hidden_size_per_attention_head = divide(projection_size, config.num_attention_heads)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, world)
        self.num_query_groups_per_partition = divide(config.num_query_groups, world)
        # the scale the softmax sees (Megatron's layer scaling divides, then multiplies back in FP32)
        self.softmax_scale = (1.0 / math.sqrt(self.hidden_size_per_attention_head)
                              if softmax_scale is None else float(softmax_scale))
        self.dropout_p = float(config.attention_dropout if attention_dropout is None else attention_dropout)
        if not 0.0 <= self.dropout_p < 1.0:
            raise UnsupportedConfigError(f"--attention-dropout {self.dropout_p}: must be in [0, 1)")

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None, packed_seq_params=None) -> torch.Tensor:
        if packed_seq_params is not None:
            raise NotImplementedError(
                "megatron_fp4 sdpa attention: packed sequences (packed_seq_params, THD layout) are not "
                "supported, nor by Megatron's local DotProductAttention (they need Transformer Engine); "
                "feed [s, b] batches (no packed_seq_params)")
        if attention_bias is not None:
            raise NotImplementedError(
                "megatron_fp4 sdpa attention: attention_bias is not supported, nor by Megatron's local "
                "DotProductAttention (it needs Transformer Engine)")
        sq, b, heads, _ = query.shape
        sk, groups = key.size(0), key.size(2)
        if heads % groups:
            raise ValueError(f"sdpa attention: {heads} query heads per rank are not a multiple of the "
                             f"{groups} key/value groups (--num-query-groups)")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))   # [b, heads, s, head_dim]
        keep, rows_all_masked, causal = None, None, False
        if attention_mask is None:
            if mask_type == AttnMaskType.causal and sq > 1:
                if sq != sk:
                    raise ValueError(f"sdpa attention: a causal mask needs as many queries as keys "
                                     f"(got {sq} and {sk}); pass an explicit attention_mask")
                causal = True
        else:
            if attention_mask.dtype != torch.bool:
                raise TypeError(f"sdpa attention: attention_mask must be boolean (True = masked out), as "
                                f"Megatron's; got {attention_mask.dtype}")
            rows_all_masked = attention_mask.all(dim=-1, keepdim=True)
            keep = ~attention_mask | rows_all_masked   # such rows are replaced below; keep SDPA finite
        if groups != heads and keep is not None:
            # the memory-efficient kernel (the one taking a mask) has no grouped-query mode
            k = k.repeat_interleave(heads // groups, dim=1)
            v = v.repeat_interleave(heads // groups, dim=1)
        dropout = self.dropout_p if self.training else 0.0
        call = lambda: torch.nn.functional.scaled_dot_product_attention(   # noqa: E731
            q, k, v, attn_mask=keep, dropout_p=dropout, is_causal=causal, scale=self.softmax_scale,
            enable_gqa=groups != heads and keep is None)
        if dropout > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = call()
        else:
            context = call()
        if rows_all_masked is not None:
            # Megatron: every score of the row is -10000, the softmax is uniform, the output the mean value
            context = torch.where(rows_all_masked, v.mean(dim=2, keepdim=True).to(context.dtype), context)
        # [b, heads, sq, head_dim] -> [sq, b, heads * head_dim]
        return context.permute(2, 0, 1, 3).reshape(sq, b, heads * value.size(-1))


__all__ = ["ATTENTION_CHOICES", "SDPAttention", "attention_choice", "build_core_attention", "fallback_reason"]
