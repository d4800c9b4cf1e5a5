"""Plugin settings on Megatron's TransformerConfig, recipe resolution, and refused combinations."""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from megatron.core.transformer.transformer_config import TransformerConfig

from ..errors import UsageError
from ..recipe import Recipe
from ..registry import RecipeError, load_recipe


class UnsupportedConfigError(UsageError):
    """A Megatron option megatron_fp4 cannot honour together with a plugin recipe (reported in one
    line by the launcher and install(); megatron_fp4/errors.py)."""


@dataclass
class NVFP4TransformerConfig(TransformerConfig):
    """TransformerConfig plus the plugin's knobs (filled from --nvfp4-* flags by the launcher).

    nvfp4_recipe: built-in recipe name or YAML path (or a Recipe object).
    nvfp4_overrides: recipe knob overrides, e.g. {"eden_group": 16}.
    nvfp4_bf16_modules: fnmatch patterns of linears kept in BF16, matched against canonical names
        `decoder.layers.<global 0-based layer>.<self_attention.linear_qkv|...|mlp.linear_fc2>`.
    Megatron's own first_last_layers_bf16 / num_layers_at_{start,end}_in_bf16 are honoured too.
    nvfp4_attention: core attention of the plugin spec, `sdpa` (torch scaled_dot_product_attention,
        the default) or `megatron` (Megatron's unfused DotProductAttention); megatron/attention.py.
    """

    nvfp4_recipe: Optional[Any] = None
    nvfp4_overrides: dict = field(default_factory=dict)
    nvfp4_bf16_modules: Sequence[str] = ()
    nvfp4_attention: str = "sdpa"


_cache: dict = {}


def resolve_recipe(config, recipe: Union[None, str, Recipe] = None) -> Recipe:
    """The recipe for a layer: the explicit argument, else config.nvfp4_recipe (+ nvfp4_overrides)."""
    overrides = dict(getattr(config, "nvfp4_overrides", None) or {})
    if recipe is None:
        recipe = getattr(config, "nvfp4_recipe", None)
    if recipe is None:
        # a stock Megatron entry point (install() registered --nvfp4-* flags): plain TransformerConfig
        args = _megatron_args()
        if args is not None and getattr(args, "nvfp4_recipe", None):
            recipe = args.nvfp4_recipe
            overrides = parse_overrides(getattr(args, "nvfp4_override", None))
    if recipe is None:
        raise RecipeError("no NVFP4 recipe configured: pass recipe=... or set config.nvfp4_recipe "
                          "(--nvfp4-recipe NAME|PATH)")
    if isinstance(recipe, Recipe):
        return recipe
    cache_key = (str(recipe), tuple(sorted((k, repr(v)) for k, v in overrides.items())))
    if cache_key not in _cache:   # one Recipe object per run: layers share it
        _cache[cache_key] = load_recipe(recipe, overrides or None)
    return _cache[cache_key]


def parse_overrides(items) -> dict:
    """--nvfp4-override KEY=VALUE items (VALUE parsed as YAML) as a dict; errors name the item."""
    import yaml
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--nvfp4-override expects KEY=VALUE, got {item!r} (e.g. --nvfp4-override eden_group=16)")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key:
            raise UsageError(f"--nvfp4-override: empty key in {item!r} (e.g. --nvfp4-override eden_group=16)")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or type(err).__name__
            raise UsageError(f"--nvfp4-override {item!r}: VALUE is not valid YAML ({problem}); write a number, "
                             f"true/false, a list like [a, b], or quote text: {key}='...'") from None
    return out


def _megatron_args():
    try:
        from megatron.training.global_vars import _GLOBAL_ARGS
    except ImportError:
        return None
    return _GLOBAL_ARGS


def _refuse(problems) -> None:
    if problems:
        raise UnsupportedConfigError("unsupported configuration: " + "; ".join(problems))


@dataclass(frozen=True)
class Refusal:
    """One Megatron setting the plugin refuses with a recipe: its flag, where it lives (Megatron's parsed
    args; TransformerConfig, where a model built without the launcher carries it) and why / the fix."""

    flag: str
    args_attr: Optional[str]
    config_attr: Optional[str]
    why: str
    allowed: tuple = (None, False, 0, "")       # values that are not the refused setting

    def problem(self, obj, attr: str) -> Optional[str]:
        value = getattr(obj, attr, None)
        if value in self.allowed:
            return None
        shown = self.flag if value is True else f"{self.flag} {value}"
        return f"{shown}: {self.why}"


_FSDP = "FSDP is not supported; use DDP (optionally --use-distributed-optimizer)"
# The one table of refused combinations; every route checks it (check_supported_args on Megatron's args:
# the launcher's GPU route, install(), the CPU driver's flags; check_supported on TransformerConfig: the
# plugin spec and layers, for models built without either).
REFUSED = (
    Refusal("--num-experts", "num_experts", "num_moe_experts",
            "MoE experts are not supported by megatron_fp4 v1 (dense GPT only); drop it"),
    Refusal("--fp8-format", "fp8", "fp8", "Transformer Engine FP8 cannot be combined with --nvfp4-recipe; "
            "drop --fp8-format"),
    Refusal("--fp4-format", "fp4", "fp4", "Transformer Engine FP4 cannot be combined with --nvfp4-recipe; "
            "drop --fp4-format (the recipe sets the 4-bit format)"),
    Refusal("--fp8-param-gather", "fp8_param_gather", "fp8_param",
            "quantized parameter all-gather (fp8/fp4 param-gather) is not supported; drop it"),
    Refusal("--fp4-param-gather", "fp4_param_gather", "fp4_param",
            "quantized parameter all-gather (fp8/fp4 param-gather) is not supported; drop it"),
    Refusal("--delay-wgrad-compute", "delay_wgrad_compute", "delay_wgrad_compute",
            "megatron_fp4 computes wgrad in the main backward; drop it"),
    Refusal("--use-megatron-fsdp", "use_megatron_fsdp", "use_megatron_fsdp", _FSDP),
    Refusal("--use-torch-fsdp2", "use_torch_fsdp2", "use_torch_fsdp2", _FSDP),
    Refusal("--use-precision-aware-optimizer", "use_precision_aware_optimizer", None,
            "master weights inside TE FusedAdam (precision-aware optimizer) are not supported; drop it"),
    Refusal("--mtp-num-layers", "mtp_num_layers", "mtp_num_layers",
            "multi-token-prediction layers are built from Megatron's stock spec and would not run the recipe; "
            "drop it"),
    Refusal("--multi-latent-attention", "multi_latent_attention", "multi_latent_attention",
            "multi-latent attention is not supported by the plugin spec in v1; drop it"),
    Refusal("--transformer-impl", "transformer_impl", None,
            "megatron_fp4 needs --transformer-impl local (its own linears, no TE modules)",
            allowed=(None, "local")),
)
REFUSED_BY_FLAG = {r.flag: r for r in REFUSED}


def check_supported(config, *, is_expert: bool = False) -> None:
    """Refuse, with a message naming the flag and the fix, combinations the plugin layers cannot honour
    (the REFUSED table, read on a TransformerConfig)."""
    problems = []
    if is_expert:
        problems.append("MoE expert linears (is_expert=True): megatron_fp4 v1 quantizes dense "
                        "layers only; drop --num-experts or keep experts out of the plugin spec")
    problems += [p for r in REFUSED if r.config_attr for p in [r.problem(config, r.config_attr)] if p]
    _refuse(problems)


def check_supported_args(args) -> None:
    """The REFUSED table on Megatron's parsed args (or the CPU driver's), before anything is built."""
    _refuse([p for r in REFUSED if r.args_attr for p in [r.problem(args, r.args_attr)] if p])


def layer_in_bf16(config, layer_number: int) -> bool:
    """Megatron's first/last-N-layers-in-BF16 rule on global 1-based layer numbers."""
    if not getattr(config, "first_last_layers_bf16", False):
        return False
    start = getattr(config, "num_layers_at_start_in_bf16", 1)
    end = getattr(config, "num_layers_at_end_in_bf16", 1)
    return layer_number <= start or layer_number > config.num_layers - end


def split_patterns(patterns) -> tuple:
    """--nvfp4-bf16-modules text (comma-separated) or a sequence of fnmatch patterns, as a tuple."""
    if not patterns:
        return ()
    if isinstance(patterns, str):
        patterns = patterns.split(",")
    return tuple(p.strip() for p in patterns if p and p.strip())


def bf16_module_patterns(config) -> tuple:
    """config.nvfp4_bf16_modules, or, for a plain TransformerConfig built by a stock Megatron entry
    point (install()), the --nvfp4-bf16-modules flag from Megatron's global args."""
    if hasattr(config, "nvfp4_bf16_modules"):
        return split_patterns(config.nvfp4_bf16_modules)
    args = _megatron_args()
    if args is not None and getattr(args, "nvfp4_recipe", None):
        return split_patterns(getattr(args, "nvfp4_bf16_modules", None))
    return ()


def module_in_bf16(config, name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in bf16_module_patterns(config))


def config_from(base: TransformerConfig, **plugin_fields) -> NVFP4TransformerConfig:
    """An NVFP4TransformerConfig copying every field of an existing TransformerConfig."""
    values = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init}
    values.update(plugin_fields)
    return NVFP4TransformerConfig(**values)
