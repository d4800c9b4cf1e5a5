"""Let the plugin's layer-spec *function* reach Megatron's TransformerBlock on every model-builder path.

`--spec megatron_fp4.spec gpt_layer_spec` names a function (the spec depends on the model's
config: recipe, norms, virtual stage). megatron-core 0.19's GPTModelBuilder (the config-container
route of `megatron.training.pretrain`) calls such a function itself; Megatron-LM's
`gpt_builders.gpt_builder` (the `model_provider` route) passes `import_module(args.spec)` straight
to GPTModel, whose TransformerBlock then raises "specialize for function.". The wrapper resolves a
spec function in `transformer_block._get_block_submodules` (which TransformerBlock looks up at call
time) the way the builder does: `fn(config, vp_stage=vp_stage)`. Specs that are not functions go to
Megatron's code unchanged.
"""
from __future__ import annotations

import functools
import inspect

_applied = False


def resolve_spec_function(spec, config, vp_stage=None):
    """A spec function's result (called as GPTModelBuilder calls it); anything else unchanged."""
    if not (inspect.isfunction(spec) or isinstance(spec, functools.partial)):
        return spec
    try:
        accepts_vp_stage = "vp_stage" in inspect.signature(spec).parameters
    except (TypeError, ValueError):
        accepts_vp_stage = False
    return spec(config, vp_stage=vp_stage) if accepts_vp_stage else spec(config)


def apply() -> None:
    global _applied
    if _applied:
        return
    from megatron.core.transformer import transformer_block

    original = transformer_block._get_block_submodules

    def _get_block_submodules(config, spec, vp_stage=None, pp_rank=None):
        return original(config, resolve_spec_function(spec, config, vp_stage), vp_stage, pp_rank)

    _get_block_submodules.__wrapped__ = original
    transformer_block._get_block_submodules = _get_block_submodules
    _applied = True
