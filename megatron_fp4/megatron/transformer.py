"""The plugin's TransformerLayer (tags its NVFP4 linears) and a sequence-parallel-capable torch norm."""
from __future__ import annotations

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer

from .config import layer_in_bf16, module_in_bf16
from .layers import NVFP4_LINEAR_TYPES


def tag_layer(layer: torch.nn.Module, config, layer_number: int) -> None:
    """Give each plugin linear in a transformer layer its identity and BF16 decision.

    Canonical names are `decoder.layers.<global 0-based layer>.<path in layer>`, the state-dict names
    of an unpipelined model, so patterns and logs mean the same thing at any PP/VPP layout.
    """
    whole_layer_bf16 = layer_in_bf16(config, layer_number)
    for rel, module in layer.named_modules():
        if isinstance(module, NVFP4_LINEAR_TYPES):
            name = f"decoder.layers.{layer_number - 1}.{rel}"
            bf16 = (whole_layer_bf16 or module_in_bf16(config, name)
                    or module.nvfp4_recipe.keeps_in_bf16(layer_number, config.num_layers, name))
            module.set_nvfp4_identity(layer_number, name, bf16)


def tag_model(model: torch.nn.Module) -> None:
    """Tag plugin linears inside any TransformerLayer of a model built from a foreign spec."""
    for module in model.modules():
        if isinstance(module, TransformerLayer):
            tag_layer(module, module.config, module.layer_number)


class NVFP4TransformerLayer(TransformerLayer):
    """TransformerLayer whose NVFP4 linears learn their global layer number right after build."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        tag_layer(self, self.config, self.layer_number)


class TorchNorm:
    """torch LayerNorm/RMSNorm that, unlike WrappedTorchNorm, allows sequence parallelism.

    Under SP each rank normalizes only its own tokens, so the norm's params carry
    `sequence_parallel=True` and Megatron's finalize_model_grads all-reduces their grads over TP.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        if getattr(config, "layernorm_zero_centered_gamma", False):
            raise ValueError("zero-centered gamma needs apex or Transformer Engine norms")
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"normalization {config.normalization!r}: LayerNorm or RMSNorm only")
        for param in norm.parameters():
            setattr(param, "sequence_parallel", bool(config.sequence_parallel))
        return norm
