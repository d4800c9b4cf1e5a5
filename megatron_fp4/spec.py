"""GPT layer spec with NVFP4 linears: `--spec megatron_fp4.spec gpt_layer_spec`, or from Python.

Builds Megatron's local spec (`get_gpt_layer_local_spec`) with the model's options and swaps
linear_qkv / linear_proj / linear_fc1 / linear_fc2 for the plugin's Column/Row classes (bound to the
run's recipe). Embeddings, the LM head, core attention and norms stay BF16. Core attention is
torch's scaled_dot_product_attention (megatron/attention.py; flash / memory-efficient kernels) unless
config.nvfp4_attention (`--nvfp4-attention`) is `megatron` (Megatron's unfused DotProductAttention).
The layer class becomes NVFP4TransformerLayer, which tags each linear with its global layer number,
so the first/last-N BF16 layers (Megatron's first_last_layers_bf16 fields) and module-name patterns
(config.nvfp4_bf16_modules) apply at build, along with the recipe's per-TP-rank shape rules.
"""
from __future__ import annotations

import copy
import functools
from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import transformer_block as _block
from megatron.core.transformer.spec_utils import ModuleSpec, get_submodules
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from .megatron.attention import attention_choice, build_core_attention
from .megatron.config import check_supported, resolve_recipe
from .megatron.layers import NVFP4ColumnParallelLinear, NVFP4RowParallelLinear
from .megatron.transformer import NVFP4TransformerLayer, TorchNorm


def _transformer_config(config):
    # GPTModelConfig (megatron.training) forwards attributes to its TransformerConfig
    return getattr(config, "transformer", None) or config


def gpt_layer_spec(config, vp_stage: Optional[int] = None, recipe=None):
    """A GPT layer spec whose four transformer linears run the configured NVFP4 recipe.

    `config`: a TransformerConfig (ideally NVFP4TransformerConfig) or Megatron's GPTModelConfig;
    the recipe comes from `recipe` or config.nvfp4_recipe (+ nvfp4_overrides). Returns a
    TransformerLayer ModuleSpec, or, when neither apex nor TE provides a block norm (CPU), the full
    TransformerBlockSubmodules with an SP-capable torch norm.
    """
    tcfg = _transformer_config(config)
    check_supported(tcfg)           # the refusal table (megatron/config.py REFUSED): MoE, MLA, TE FP8/FP4, ...
    recipe = resolve_recipe(tcfg, recipe)
    spec = get_gpt_layer_local_spec(
        qk_layernorm=getattr(tcfg, "qk_layernorm", False),
        normalization=getattr(tcfg, "normalization", "LayerNorm"),
        qk_l2_norm=getattr(tcfg, "qk_l2_norm", False),
    )
    spec = copy.deepcopy(spec)
    column = functools.partial(NVFP4ColumnParallelLinear, recipe=recipe)
    row = functools.partial(NVFP4RowParallelLinear, recipe=recipe)
    attn = spec.submodules.self_attention.submodules
    attn.linear_qkv, attn.linear_proj = column, row
    if attention_choice(tcfg) == "sdpa":
        attn.core_attention = build_core_attention
    mlp = get_submodules(spec.submodules.mlp)
    mlp.linear_fc1, mlp.linear_fc2 = column, row
    spec.module = NVFP4TransformerLayer

    # WrappedTorchNorm (the local spec's norm without apex) refuses sequence parallelism
    subs = spec.submodules
    for slot in ("input_layernorm", "pre_mlp_layernorm"):
        if getattr(subs, slot) is WrappedTorchNorm:
            setattr(subs, slot, TorchNorm)
    if _block.LayerNormImpl is WrappedTorchNorm or (
            _block.LayerNormImpl is _block.FusedLayerNorm and not _apex_norm_available()):
        num_layers = _block.get_num_layers_to_build(tcfg, vp_stage)
        return _block.TransformerBlockSubmodules(layer_specs=[spec] * num_layers, layer_norm=TorchNorm)
    return spec


def _apex_norm_available() -> bool:
    from megatron.core.fusions import fused_layer_norm
    return bool(fused_layer_norm.HAVE_FUSED_LAYER_NORM or fused_layer_norm.HAVE_PERSIST_LAYER_NORM)


def linear_specs(spec) -> dict:
    """The four linear slots of a layer spec (for inspection and tests)."""
    if isinstance(spec, _block.TransformerBlockSubmodules):
        spec = spec.layer_specs[0]
    attn = spec.submodules.self_attention.submodules
    mlp = get_submodules(spec.submodules.mlp)
    return {"linear_qkv": attn.linear_qkv, "linear_proj": attn.linear_proj,
            "linear_fc1": mlp.linear_fc1, "linear_fc2": mlp.linear_fc2}


__all__ = ["gpt_layer_spec", "linear_specs", "ModuleSpec"]
