"""Plugin settings on Megatron's TransformerConfig, recipe resolution, and refused combinations."""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from megatron.core.transformer.transformer_config import TransformerConfig

from ..recipe import Recipe
from ..registry import RecipeError, load_recipe


class UnsupportedConfigError(ValueError):
    """A Megatron option megatron_fp4 cannot honour together with a plugin recipe."""


@dataclass
class NVFP4TransformerConfig(TransformerConfig):
    """TransformerConfig plus the plugin's knobs (filled from --mfp4-* flags by the launcher).

    mfp4_recipe: built-in recipe name or YAML path (or a Recipe object).
    mfp4_overrides: recipe knob overrides, e.g. {"eden_group": 16}.
    mfp4_bf16_modules: fnmatch patterns of linears kept in BF16, matched against canonical names
        `decoder.layers.<global 0-based layer>.<self_attention.linear_qkv|...|mlp.linear_fc2>`.
    Megatron's own first_last_layers_bf16 / num_layers_at_{start,end}_in_bf16 are honoured too.
    """

    mfp4_recipe: Optional[Any] = None
    mfp4_overrides: dict = field(default_factory=dict)
    mfp4_bf16_modules: Sequence[str] = ()


_cache: dict = {}


def resolve_recipe(config, recipe: Union[None, str, Recipe] = None) -> Recipe:
    """The recipe for a layer: the explicit argument, else config.mfp4_recipe (+ mfp4_overrides)."""
    overrides = dict(getattr(config, "mfp4_overrides", None) or {})
    if recipe is None:
        recipe = getattr(config, "mfp4_recipe", None)
    if recipe is None:
        # a stock Megatron entry point (install() registered --mfp4-* flags): plain TransformerConfig
        args = _megatron_args()
        if args is not None and getattr(args, "mfp4_recipe", None):
            recipe = args.mfp4_recipe
            from ..pretrain_gpt import parse_overrides
            overrides = parse_overrides(getattr(args, "mfp4_override", None))
    if recipe is None:
        raise RecipeError("no NVFP4 recipe configured: pass recipe=... or set config.mfp4_recipe "
                          "(--mfp4-recipe NAME|PATH)")
    if isinstance(recipe, Recipe):
        return recipe
    cache_key = (str(recipe), tuple(sorted((k, repr(v)) for k, v in overrides.items())))
    if cache_key not in _cache:   # one Recipe object per run: layers share it
        _cache[cache_key] = load_recipe(recipe, overrides or None)
    return _cache[cache_key]


def _megatron_args():
    try:
        from megatron.training.global_vars import _GLOBAL_ARGS
    except ImportError:
        return None
    return _GLOBAL_ARGS


def check_supported(config, *, is_expert: bool = False) -> None:
    """Refuse, with a message naming the flag, combinations the plugin layers cannot honour."""
    problems = []
    if is_expert:
        problems.append("MoE expert linears (is_expert=True): megatron_fp4 v1 quantizes dense "
                        "layers only; drop --num-experts or keep experts out of the plugin spec")
    if getattr(config, "fp8", None):
        problems.append(f"--fp8-format {config.fp8}: Transformer Engine FP8 cannot be combined with "
                        "a megatron_fp4 recipe")
    if getattr(config, "fp4", None):
        problems.append(f"--fp4-format {config.fp4}: Transformer Engine FP4 cannot be combined with "
                        "a megatron_fp4 recipe (use --mfp4-recipe only)")
    for flag, attr in (("--fp8-param-gather", "fp8_param"), ("--fp4-param-gather", "fp4_param")):
        if getattr(config, attr, False):
            problems.append(f"{flag}: quantized parameter all-gather is not supported")
    if getattr(config, "delay_wgrad_compute", False):
        problems.append("--delay-wgrad-compute: megatron_fp4 computes wgrad in the main backward")
    if getattr(config, "defer_embedding_wgrad_compute", False):
        pass  # affects only the LM head (a stock layer); refused in _forward_impl if it ever reaches us
    if getattr(config, "use_megatron_fsdp", False) or getattr(config, "use_torch_fsdp2", False):
        problems.append("FSDP (--use-megatron-fsdp / --use-torch-fsdp2) is not supported")
    if problems:
        raise UnsupportedConfigError("megatron_fp4: unsupported configuration:\n  - " + "\n  - ".join(problems))


def check_supported_args(args) -> None:
    """Launcher-level refusals for options that live outside TransformerConfig."""
    problems = []
    if getattr(args, "use_precision_aware_optimizer", False):
        problems.append("--use-precision-aware-optimizer: master weights inside TE FusedAdam are "
                        "not supported")
    if getattr(args, "use_megatron_fsdp", False) or getattr(args, "use_torch_fsdp2", False):
        problems.append("FSDP (--use-megatron-fsdp / --use-torch-fsdp2) is not supported")
    if getattr(args, "num_experts", None):
        problems.append("--num-experts: MoE experts are not supported by megatron_fp4 v1")
    if getattr(args, "fp8", None):
        problems.append("--fp8-format cannot be combined with --mfp4-recipe")
    if getattr(args, "fp4", None):
        problems.append("--fp4-format cannot be combined with --mfp4-recipe")
    if getattr(args, "fp8_param_gather", False) or getattr(args, "fp4_param_gather", False):
        problems.append("--fp8-param-gather / --fp4-param-gather are not supported")
    if getattr(args, "delay_wgrad_compute", False):
        problems.append("--delay-wgrad-compute is not supported")
    if getattr(args, "transformer_impl", "local") != "local":
        problems.append(f"--transformer-impl {args.transformer_impl}: megatron_fp4 needs "
                        "--transformer-impl local (its own linears, no TE modules)")
    if problems:
        raise UnsupportedConfigError("megatron_fp4: unsupported configuration:\n  - " + "\n  - ".join(problems))


def layer_in_bf16(config, layer_number: int) -> bool:
    """Megatron's first/last-N-layers-in-BF16 rule on global 1-based layer numbers."""
    if not getattr(config, "first_last_layers_bf16", False):
        return False
    start = getattr(config, "num_layers_at_start_in_bf16", 1)
    end = getattr(config, "num_layers_at_end_in_bf16", 1)
    return layer_number <= start or layer_number > config.num_layers - end


def module_in_bf16(config, name: str) -> bool:
    patterns = getattr(config, "mfp4_bf16_modules", None) or ()
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p]
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def config_from(base: TransformerConfig, **plugin_fields) -> NVFP4TransformerConfig:
    """An NVFP4TransformerConfig copying every field of an existing TransformerConfig."""
    values = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init}
    values.update(plugin_fields)
    return NVFP4TransformerConfig(**values)
