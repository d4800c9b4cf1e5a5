"""Start-time checks of a run's plugin and model-shape settings, on every route (the CPU driver, the
launcher's GPU route and install() in a Megatron-LM checkout) before any model is built and before
Megatron prints its argument table; and the run log's line saying which linears stay in BF16.

Everything here reads Megatron-named attributes (`num_layers`, `hidden_size`, ...), so the CPU
parser's namespace and Megatron's own parsed args (before `validate_args` fills its defaults) both
work. Every failure is a `UsageError` naming the flag and the fix (reported in one line).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import os
import types
from typing import Optional

from ..errors import UsageError
from .config import parse_overrides  # noqa: F401  (the launcher's plugin flags)

# The plugin spec's four linears of every transformer layer, by their path inside the layer.
LINEAR_SLOTS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


# The plugin's flags were --mfp4-* in earlier versions; they are --nvfp4-* now (named for the format).
OLD_FLAG_PREFIX = "--" + "mfp4-"


def check_renamed_flags(argv) -> None:
    """A flag under the old --mfp4- prefix is refused with its new name (not Megatron's bare
    'unrecognized arguments')."""
    for token in argv:
        if isinstance(token, str) and token.startswith(OLD_FLAG_PREFIX):
            old = token.split("=", 1)[0]
            new = "--nvfp4-" + old[len(OLD_FLAG_PREFIX):]
            raise UsageError(f"{old} was renamed to {new} (all of the plugin's flags are --nvfp4-* now); "
                             f"pass {new}")


# --------------------------------------------------------------------------------------------------
# Plugin flags: recipe and overrides
# --------------------------------------------------------------------------------------------------

def plugin_recipe(args):
    """The run's recipe from --nvfp4-recipe and --nvfp4-override (a RecipeError, reported in one line).
    Errors of the recipe itself name --nvfp4-recipe; errors an override causes name that override,
    not the shipped YAML."""
    from ..registry import RecipeError, build_recipe, load_recipe
    name = getattr(args, "nvfp4_recipe", None)
    if not name:
        raise RecipeError("no recipe: pass --nvfp4-recipe NAME|PATH")
    items = list(getattr(args, "nvfp4_override", None) or [])
    overrides = parse_overrides(items)
    try:
        base = load_recipe(name)
    except RecipeError as err:
        raise RecipeError(f"--nvfp4-recipe {name}: {err}") from None
    if not overrides:
        return base
    data = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    data["family"] = base.family
    for item in items:                      # each override alone: the error names the one at fault
        key = item.split("=", 1)[0].strip()
        try:
            build_recipe({**data, key: overrides[key]}, source=f"--nvfp4-override {item}")
        except RecipeError as err:
            raise RecipeError(f"{err} (recipe {base.name!r})") from None
    data.update(overrides)
    try:
        return build_recipe(data, source="--nvfp4-override " + " ".join(items))
    except RecipeError as err:
        raise RecipeError(f"{err} (recipe {base.name!r})") from None


# --------------------------------------------------------------------------------------------------
# Linears and BF16 rules
# --------------------------------------------------------------------------------------------------

def linear_names(num_layers: int) -> list:
    """Canonical names of the plugin linears (decoder.layers.<global 0-based layer>.<slot>)."""
    return [f"decoder.layers.{i}.{slot}" for i in range(num_layers) for slot in LINEAR_SLOTS]


def describe_linear_names(num_layers: int) -> str:
    layers = "0" if num_layers == 1 else f"{{0..{num_layers - 1}}}"
    return f"decoder.layers.{layers}.{{{', '.join(LINEAR_SLOTS)}}}"


def check_patterns(patterns, num_layers: int, source: str) -> None:
    """Every BF16 pattern must match at least one linear: one that matches none changes nothing."""
    names = linear_names(num_layers)
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise UsageError(
                f"{source}: pattern {pattern!r} matches no linear of this {num_layers}-layer model; its "
                f"{len(names)} linears are {describe_linear_names(num_layers)} "
                "(e.g. 'decoder.layers.0.*' or '*.mlp.linear_fc2')")


def bf16_linears(recipe, num_layers: int, patterns=(), first_last_layers_bf16: bool = False,
                 start: int = 1, end: int = 1) -> list:
    """The linears a run keeps in BF16, by the same rules NVFP4TransformerLayer applies at build
    (Megatron's first/last-layer flags, --nvfp4-bf16-modules, the recipe's own bf16 knobs)."""
    from .config import layer_in_bf16, module_in_bf16
    names = linear_names(num_layers)
    if not recipe.quantized:
        return names
    cfg = types.SimpleNamespace(first_last_layers_bf16=first_last_layers_bf16, num_layers_at_start_in_bf16=start,
                                num_layers_at_end_in_bf16=end, num_layers=num_layers,
                                nvfp4_bf16_modules=tuple(patterns))
    out = []
    for name in names:
        layer_number = int(name.split(".")[2]) + 1
        if (layer_in_bf16(cfg, layer_number) or module_in_bf16(cfg, name)
                or recipe.keeps_in_bf16(layer_number, num_layers, name)):
            out.append(name)
    return out


def describe_bf16(bf16: list, num_layers: int) -> str:
    """'none', 'all N', or the BF16 linears grouped by layer (a whole layer as decoder.layers.i.*)."""
    total = num_layers * len(LINEAR_SLOTS)
    if not bf16:
        return f"none of the {total} linears"
    if len(bf16) == total:
        return f"all {total} linears"
    chosen, parts = set(bf16), []
    for i in range(num_layers):
        layer = [f"decoder.layers.{i}.{slot}" for slot in LINEAR_SLOTS]
        inside = [n for n in layer if n in chosen]
        if len(inside) == len(layer):
            parts.append(f"decoder.layers.{i}.*")
        else:
            parts += inside
    return f"{len(bf16)} of {total} linears: " + ", ".join(parts)


# --------------------------------------------------------------------------------------------------
# Model shape
# --------------------------------------------------------------------------------------------------

POSITIVE_FLAGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "seq_length",
                  "micro_batch_size", "global_batch_size", "train_iters", "tensor_model_parallel_size",
                  "pipeline_model_parallel_size", "context_parallel_size", "num_query_groups", "kv_channels",
                  "max_position_embeddings", "log_interval", "eval_interval",
                  "num_layers_per_virtual_pipeline_stage", "num_virtual_stages_per_pipeline_rank")


def flag(attr: str) -> str:
    return "--" + attr.replace("_", "-")


@dataclasses.dataclass
class ModelDims:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    heads: int
    query_groups: int
    kv_channels: int
    swiglu: bool
    tp: int

    def local_shapes(self) -> dict:
        """slot -> (in_features, out_features) of the per-TP-rank weight, and the flags that set them."""
        q = self.heads * self.kv_channels
        qkv_out = self.kv_channels * (self.heads + 2 * self.query_groups)
        fc1_out = self.ffn_hidden_size * (2 if self.swiglu else 1)
        heads_flags = "--hidden-size / --num-attention-heads / --tensor-model-parallel-size"
        return {
            "self_attention.linear_qkv": (self.hidden_size, qkv_out // self.tp, heads_flags),
            "self_attention.linear_proj": (q // self.tp, self.hidden_size, heads_flags),
            "mlp.linear_fc1": (self.hidden_size, fc1_out // self.tp,
                               "--hidden-size / --ffn-hidden-size / --tensor-model-parallel-size"),
            "mlp.linear_fc2": (self.ffn_hidden_size // self.tp, self.hidden_size,
                               "--hidden-size / --ffn-hidden-size / --tensor-model-parallel-size"),
        }


def check_positive(args) -> None:
    for attr in POSITIVE_FLAGS:
        value = getattr(args, attr, None)
        if value is not None and not isinstance(value, bool) and value < 1:
            raise UsageError(f"{flag(attr)} must be >= 1, got {value}")
    for attr in ("eval_iters", "num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"):
        value = getattr(args, attr, None)
        if value is not None and value < 0:
            raise UsageError(f"{flag(attr)} must be >= 0, got {value}")


def model_dims(args) -> ModelDims:
    """The transformer's dimensions with Megatron's defaults for what is left out, after checking
    that heads, groups and the TP size divide what they split."""
    check_positive(args)
    hidden, heads = args.hidden_size, args.num_attention_heads
    if hidden is None or heads is None or getattr(args, "num_layers", None) is None:
        missing = [flag(a) for a in ("num_layers", "hidden_size", "num_attention_heads") if getattr(args, a, None) is None]
        raise UsageError(f"{', '.join(missing)} missing: the model size needs --num-layers, --hidden-size and "
                         "--num-attention-heads")
    swiglu = bool(getattr(args, "swiglu", False))
    ffn = getattr(args, "ffn_hidden_size", None)
    if ffn is None:                      # Megatron's validate_args default
        ffn = int((4 * hidden * 2 / 3) / 64) * 64 if swiglu else 4 * hidden
        if ffn < 1:
            raise UsageError(f"--hidden-size {hidden} gives an empty default FFN size; pass --ffn-hidden-size")
    kv = getattr(args, "kv_channels", None)
    if kv is None:
        if hidden % heads:
            raise UsageError(f"--hidden-size {hidden} is not divisible by --num-attention-heads {heads} (each head "
                             f"gets hidden-size / heads channels); pick a head count that divides it, e.g. "
                             f"{_divisor_near(hidden, heads)}")
        kv = hidden // heads
    groups = heads
    if getattr(args, "group_query_attention", False) and getattr(args, "num_query_groups", None):
        groups = args.num_query_groups
        if heads % groups:
            raise UsageError(f"--num-attention-heads {heads} is not divisible by --num-query-groups {groups}")
    tp = getattr(args, "tensor_model_parallel_size", 1) or 1
    for what, value in (("--num-attention-heads", heads), ("--num-query-groups" if groups != heads else None, groups),
                        ("--ffn-hidden-size", ffn)):
        if what and value % tp:
            raise UsageError(f"{what} {value} is not divisible by --tensor-model-parallel-size {tp} "
                             "(tensor parallelism splits it across the ranks)")
    return ModelDims(args.num_layers, hidden, ffn, heads, groups, kv, swiglu, tp)


def _divisor_near(n: int, k: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - k), d))


def check_sequence(args) -> None:
    seq = getattr(args, "seq_length", None)
    if seq is None:
        return
    tp = getattr(args, "tensor_model_parallel_size", 1) or 1
    if getattr(args, "sequence_parallel", False) and tp > 1 and seq % tp:
        raise UsageError(f"--sequence-parallel splits the sequence over the {tp} tensor-parallel ranks: "
                         f"--seq-length {seq} must be divisible by --tensor-model-parallel-size {tp}")
    cp = getattr(args, "context_parallel_size", 1) or 1
    if cp > 1 and seq % (2 * cp):
        raise UsageError(f"--seq-length {seq} must be divisible by 2 x --context-parallel-size {cp}")
    max_pos = getattr(args, "max_position_embeddings", None)
    if max_pos is not None and max_pos < seq:
        raise UsageError(f"--max-position-embeddings {max_pos} < --seq-length {seq}; raise it (or leave it out)")


UNEVEN_PIPELINE_FLAGS = ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage",
                         "pipeline_model_parallel_layout", "account_for_embedding_in_pipeline_split",
                         "account_for_loss_in_pipeline_split", "decoder_first_pipeline_num_layers",
                         "decoder_last_pipeline_num_layers")


def check_pipeline(args, world_size: Optional[int] = None) -> None:
    """PP / virtual stages must split the layers evenly; TP x PP (x CP) must divide the world."""
    layers = args.num_layers
    tp = getattr(args, "tensor_model_parallel_size", 1) or 1
    pp = getattr(args, "pipeline_model_parallel_size", 1) or 1
    cp = getattr(args, "context_parallel_size", 1) or 1
    per = getattr(args, "num_layers_per_virtual_pipeline_stage", None)
    vpp = getattr(args, "num_virtual_stages_per_pipeline_rank", None)
    # Megatron's uneven pipeline splits: it checks those itself
    uneven = any(getattr(args, a, None) for a in UNEVEN_PIPELINE_FLAGS)
    if per is not None and vpp is not None:
        raise UsageError("--num-layers-per-virtual-pipeline-stage and --num-virtual-stages-per-pipeline-rank say "
                         "the same thing; pass one")
    if per is not None and not uneven:
        if layers % (pp * per):
            raise UsageError(f"--num-layers {layers} is not divisible by --pipeline-model-parallel-size x "
                             f"--num-layers-per-virtual-pipeline-stage = {pp} x {per}; pick --num-layers as a "
                             f"multiple of {pp * per}")
    elif vpp is not None and vpp > 1 and not uneven:
        if layers % (pp * vpp):
            raise UsageError(f"--num-layers {layers} is not divisible by --pipeline-model-parallel-size x "
                             f"--num-virtual-stages-per-pipeline-rank = {pp} x {vpp}; pick --num-layers as a "
                             f"multiple of {pp * vpp}")
    elif layers % pp and not uneven:
        raise UsageError(f"--num-layers {layers} is not divisible by --pipeline-model-parallel-size {pp}")
    if (per is not None or (vpp or 1) > 1) and pp < 2:
        raise UsageError("virtual pipeline stages need --pipeline-model-parallel-size >= 2")
    if world_size is not None and world_size % (tp * pp * cp):
        raise UsageError(f"world size {world_size} is not divisible by TP x PP x CP = {tp} x {pp} x {cp}; change "
                         "the torchrun process count or the parallel sizes")


def check_shapes(recipe, dims: ModelDims, bf16: list) -> None:
    """The recipe's divisibility rules on every quantized linear's per-TP-rank weight."""
    chosen = set(bf16)
    for slot, (k, n, flags) in dims.local_shapes().items():
        quantized = [i for i in range(dims.num_layers) if f"decoder.layers.{i}.{slot}" not in chosen]
        if not quantized:
            continue
        try:
            recipe.check_shapes(k, n)
        except ValueError as err:
            name = f"decoder.layers.{quantized[0]}.{slot}"
            raise UsageError(
                f"{name}: per-TP-rank weight [{n}, {k}] (out x in): {err}; change {flags}, or keep these linears "
                f"in BF16 with --nvfp4-bf16-modules '*.{slot}'") from None


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------

DATA_PATH_FLAGS = ("data_path", "train_data_path", "valid_data_path", "test_data_path")


def _prefixes(value) -> list:
    """Dataset prefixes of a --*-data-path value (a string or Megatron's list, blend weights skipped)."""
    if value is None:
        return []
    items = value.split() if isinstance(value, str) else list(value)
    out = []
    for item in items:
        try:
            float(item)
        except ValueError:
            out.append(item)
    return out


def check_data_paths(args, skip_under: Optional[str] = None) -> None:
    """Each --data-path / --{train,valid,test}-data-path prefix must name an indexed dataset (PREFIX.bin
    and PREFIX.idx); --mock-data takes no path. `skip_under`: the launcher's own corpus directory
    (built later)."""
    given = [(flag(a), p) for a in DATA_PATH_FLAGS for p in _prefixes(getattr(args, a, None))
             if "://" not in p        # object storage (Megatron's MSC): not checked here
             and not (skip_under and os.path.abspath(p).startswith(os.path.abspath(skip_under) + os.sep))]
    if getattr(args, "mock_data", False) and given:
        raise UsageError(f"--mock-data cannot be combined with {given[0][0]} (mock data reads no files); drop one")
    for what, prefix in given:
        if prefix.endswith((".bin", ".idx")):
            raise UsageError(f"{what} {prefix}: pass the dataset prefix without .bin/.idx "
                             f"({os.path.splitext(prefix)[0]})")
        missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
        if missing:
            raise UsageError(f"{what} {prefix}: no indexed dataset there ({' and '.join(missing)} not found); pass "
                             "an existing prefix, e.g. one built by `python -m megatron_fp4.data.corpus --out DIR` "
                             "(DIR/train, DIR/valid)")
    for attr in ("data_args_path", "per_split_data_args_path"):
        path = getattr(args, attr, None)
        if path and not os.path.isfile(path):
            raise UsageError(f"{flag(attr)} {path}: file not found")


def check_tokens_cover_sequence(n_tokens: int, seq_length: int, split: str, where: str) -> None:
    """A split must hold more than one sequence plus its label (windows are drawn inside it)."""
    if n_tokens <= seq_length + 1:
        raise UsageError(f"--seq-length {seq_length}: the {split} split ({where}) has only {n_tokens} tokens, "
                         f"not more than one sequence and its label ({seq_length + 1}); lower --seq-length or use "
                         "more data (more or larger files in --nvfp4-corpus-src, or --data-path / --valid-data-path)")


# --------------------------------------------------------------------------------------------------
# Everything, in order
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class RunPlan:
    recipe: object
    bf16: list
    num_layers: int
    bf16_from: Optional[int] = None           # --nvfp4-bf16-from, as an iteration
    bf16_scope: str = "all"

    def bf16_line(self) -> str:
        line = f"megatron_fp4: recipe {self.recipe.name}; linears kept in BF16: {describe_bf16(self.bf16, self.num_layers)}"
        if self.bf16_from is not None:
            what = "every linear" if self.bf16_scope == "all" else "the forward GEMM of every linear"
            line += f"; from iteration {self.bf16_from} on {what} runs in BF16 (--nvfp4-bf16-from)"
        return line

    def apply(self) -> None:
        """Declare the run-wide switches of the plan to the layers (megatron/state.py)."""
        from . import state
        state.set_bf16_from(self.bf16_from, self.bf16_scope)


def resolve_bf16_from(args) -> Optional[int]:
    """--nvfp4-bf16-from: an iteration (>= 1, the log's numbering) or a fraction in (0, 1) of --train-iters
    (0.9 of 100 iterations: iterations 91-100 in BF16). None without the flag."""
    value = getattr(args, "nvfp4_bf16_from", None)
    if value is None:
        return None
    train_iters = getattr(args, "train_iters", None)
    if 0 < value < 1:
        if not train_iters:
            raise UsageError(f"--nvfp4-bf16-from {value}: a fraction needs --train-iters; give an iteration instead")
        return int(value * train_iters) + 1
    if value < 1 or value != int(value):
        raise UsageError(f"--nvfp4-bf16-from {value}: expected an iteration (an integer >= 1) or a fraction of "
                         "--train-iters in (0, 1)")
    if train_iters and value > train_iters:
        raise UsageError(f"--nvfp4-bf16-from {int(value)} is after the last iteration (--train-iters {train_iters}): "
                         "the switch would never happen")
    return int(value)


def check_cuda_graphs(args, recipe) -> None:
    """Megatron's CUDA graphs with the plugin: `--cuda-graph-impl local` (per-layer graphs, captured after
    the first step) is correct — the random streams read the iteration and call index from device
    tensors that the host rewrites in place before each step (rng.py, state.py), so every replay draws
    fresh bits, the ones eager execution draws. Refused: OutControl (its recording and channel selection
    run on host state in the layer's forward: a graph would freeze them), `full_iteration` (the
    iteration's device state is rewritten inside forward_step, which such a graph captures with its
    first value), and Transformer Engine's graph paths."""
    impl = getattr(args, "cuda_graph_impl", "none") or "none"
    if getattr(args, "enable_cuda_graph", False) and impl == "none":
        impl = "local"                       # Megatron's older switch for the local implementation
    if getattr(args, "external_cuda_graph", False) or impl == "transformer_engine":
        flag = "--external-cuda-graph" if getattr(args, "external_cuda_graph", False) else \
            "--cuda-graph-impl transformer_engine"
        raise UsageError(f"{flag}: Transformer Engine's CUDA graphs need TE modules, which the plugin spec does not "
                         "use; pass --cuda-graph-impl local")
    if impl == "none":
        return
    if getattr(args, "nvfp4_bf16_from", None) is not None:
        raise UsageError(f"--nvfp4-bf16-from with --cuda-graph-impl {impl}: the switch is decided on the host in each "
                         "forward, which captured graphs skip; drop one of them")
    if impl == "full_iteration":
        raise UsageError("--cuda-graph-impl full_iteration: the plugin's per-step random state is rewritten by the "
                         "host at the start of each step, inside what a full-iteration graph captures (every replay "
                         "would reuse the first step's random bits); pass --cuda-graph-impl local")
    if recipe.outcontrol:
        raise UsageError(f"--cuda-graph-impl {impl} with recipe {recipe.name!r}: OutControl records and selects "
                         "outlier channels on host state in each forward, which a captured graph would freeze; "
                         "use a recipe without OutControl (e.g. quartet2, tetrajet2) or drop --cuda-graph-impl")


def validate_run(args, world_size: Optional[int] = None) -> RunPlan:
    """Refusals, recipe and overrides, BF16 patterns, model shape and layout: the plugin's start-time
    checks. Returns the recipe and the linears kept in BF16."""
    from .config import check_supported_args, split_patterns
    check_supported_args(args)
    recipe = plugin_recipe(args)
    check_cuda_graphs(args, recipe)
    dims = model_dims(args)
    check_sequence(args)
    check_pipeline(args, world_size)
    patterns = split_patterns(getattr(args, "nvfp4_bf16_modules", None))
    check_patterns(patterns, dims.num_layers, "--nvfp4-bf16-modules")
    check_patterns(recipe.bf16_modules, dims.num_layers, f"recipe {recipe.name!r} knob bf16_modules")
    bf16 = bf16_linears(recipe, dims.num_layers, patterns,
                        bool(getattr(args, "first_last_layers_bf16", False)),
                        getattr(args, "num_layers_at_start_in_bf16", 1), getattr(args, "num_layers_at_end_in_bf16", 1))
    check_shapes(recipe, dims, bf16)
    return RunPlan(recipe, bf16, dims.num_layers, resolve_bf16_from(args),
                   getattr(args, "nvfp4_bf16_from_scope", None) or "all")
